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


def cuda_module(fmt: str):
    """The CUDA kernel module of the format named `fmt` (`bitmap_cuda` or `tiled_csl_cuda`): its
    `KERNEL`, `linear` and launch configurations. Importing it loads nothing (see above)."""
    from . import bitmap_cuda, tiled_csl_cuda

    modules = {bitmap_cuda.FORMAT: bitmap_cuda, tiled_csl_cuda.FORMAT: tiled_csl_cuda}
    if fmt not in modules:
        raise ValueError(f"no CUDA kernel for format {fmt!r}; there are kernels for {sorted(modules)}")
    return modules[fmt]


def unregister_cuda_kernels() -> None:
    from ..formats import BitmapWeight, TiledCSLWeight

    for cls in (BitmapWeight, TiledCSLWeight):
        FAST_KERNELS.pop((cls.format_code, "cuda"), None)


if os.environ.get(ENV_FLAG, "1") != "0":
    register_cuda_kernels()

__all__ = ["ENV_FLAG", "FAST_KERNELS", "cuda_module", "kernel_path", "register_cuda_kernels", "spmm",
           "unregister_cuda_kernels"]
