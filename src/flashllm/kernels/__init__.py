"""Sparse x dense products: the reference path and, where registered, fast GPU kernels.

The CUDA kernels (``bitmap_cuda``, ``tiled_csl_cuda``) are EXPERIMENTAL: they were written and
compiled without a GPU and stay off until validated on one. ``FLASHLLM_CUDA_KERNELS=1`` in the
environment registers them at import (or call `register_cuda_kernels()`); without it every CUDA
product takes the reference path. Registering loads nothing: NVRTC and the driver are opened on the
first CUDA call, so CPU-only installs are unaffected either way.
"""

import os

from .spmm import FAST_KERNELS, kernel_path, spmm

ENV_FLAG = "FLASHLLM_CUDA_KERNELS"


def register_cuda_kernels() -> None:
    """Route `spmm` on CUDA tensors through the experimental CUDA kernels (fp16/bf16)."""
    from ..formats import BitmapWeight, TiledCSLWeight
    from . import bitmap_cuda, tiled_csl_cuda

    FAST_KERNELS[(BitmapWeight.format_code, "cuda")] = bitmap_cuda.fast_kernel
    FAST_KERNELS[(TiledCSLWeight.format_code, "cuda")] = tiled_csl_cuda.fast_kernel


def unregister_cuda_kernels() -> None:
    from ..formats import BitmapWeight, TiledCSLWeight

    for cls in (BitmapWeight, TiledCSLWeight):
        FAST_KERNELS.pop((cls.format_code, "cuda"), None)


if os.environ.get(ENV_FLAG) == "1":
    register_cuda_kernels()

__all__ = ["ENV_FLAG", "FAST_KERNELS", "kernel_path", "register_cuda_kernels", "spmm", "unregister_cuda_kernels"]
