"""Sparse x dense products: the reference path and, where registered, fast GPU kernels."""

from .spmm import FAST_KERNELS, kernel_path, spmm

__all__ = ["FAST_KERNELS", "kernel_path", "spmm"]
