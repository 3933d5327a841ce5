"""Sparse x dense products: the reference path and, where registered, fast GPU kernels.

The CUDA kernels (``bitmap_cuda``, ``tiled_csl_cuda``) are registered at import: on an H200 they
pass the GPU test grid, and although they are still slower than cuBLAS on the dense weight (see
BENCHMARKS.md), they are several times faster than the reference path, which decodes the whole
weight on every call. ``FLASHLLM_CUDA_KERNELS=0`` in the environment leaves them out (or call
`unregister_cuda_kernels()`). Registering loads nothing: NVRTC and the driver are opened on the
first CUDA call, so CPU-only installs are unaffected either way.
"""

import os

from .spmm import FAST_KERNELS, kernel_path, spmm

ENV_FLAG = "FLASHLLM_CUDA_KERNELS"


def register_cuda_kernels() -> None:
    """Route `spmm` on CUDA tensors through the CUDA kernels (fp16/bf16; they decline other inputs)."""
    from ..formats import BitmapWeight, TiledCSLWeight
    from . import bitmap_cuda, tiled_csl_cuda

    FAST_KERNELS[(BitmapWeight.format_code, "cuda")] = bitmap_cuda.fast_kernel
    FAST_KERNELS[(TiledCSLWeight.format_code, "cuda")] = tiled_csl_cuda.fast_kernel


def unregister_cuda_kernels() -> None:
    from ..formats import BitmapWeight, TiledCSLWeight

    for cls in (BitmapWeight, TiledCSLWeight):
        FAST_KERNELS.pop((cls.format_code, "cuda"), None)


if os.environ.get(ENV_FLAG, "1") != "0":
    register_cuda_kernels()

__all__ = ["ENV_FLAG", "FAST_KERNELS", "kernel_path", "register_cuda_kernels", "spmm", "unregister_cuda_kernels"]
