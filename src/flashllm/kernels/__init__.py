"""Sparse x dense products: the reference path and, where registered, fast GPU kernels.

The CUDA kernels (``bitmap_cuda``, ``tiled_csl_cuda``, ``tiled_csl16_cuda``) are registered at import:
on an H200 the first two pass the GPU test grid (tiled_csl16's has not run on a GPU yet; the
first-use check of each variant stands guard), and although they are still slower than cuBLAS on
the dense weight (see BENCHMARKS.md), they are several times faster than the reference path, which
decodes the whole weight on every call. ``FLASHLLM_CUDA_KERNELS=0`` in the environment leaves them out (or call
`unregister_cuda_kernels()`). Registering loads nothing: NVRTC and the driver are opened on the
first CUDA call, so CPU-only installs are unaffected either way.
"""

import os

from .spmm import FAST_KERNELS, kernel_path, spmm

ENV_FLAG = "FLASHLLM_CUDA_KERNELS"


def register_cuda_kernels() -> None:
    """Route `spmm` on CUDA tensors through the CUDA kernels (fp16/bf16; they decline other inputs)."""
    from ..formats import get_format

    for module in _modules().values():
        FAST_KERNELS[(get_format(module.FORMAT).format_code, "cuda")] = module.fast_kernel


def _modules() -> dict:
    from . import bitmap_cuda, tiled_csl16_cuda, tiled_csl_cuda

    return {m.FORMAT: m for m in (bitmap_cuda, tiled_csl_cuda, tiled_csl16_cuda)}


def cuda_module(fmt: str):
    """The CUDA kernel module of the format named `fmt` (`bitmap_cuda`, `tiled_csl_cuda` or
    `tiled_csl16_cuda`): its `KERNEL`, `linear` and launch configurations. Importing it loads
    nothing (see above)."""
    modules = _modules()
    if fmt not in modules:
        raise ValueError(f"no CUDA kernel for format {fmt!r}; there are kernels for {sorted(modules)}")
    return modules[fmt]


def unregister_cuda_kernels() -> None:
    from ..formats import get_format

    for fmt in _modules():
        FAST_KERNELS.pop((get_format(fmt).format_code, "cuda"), None)


if os.environ.get(ENV_FLAG, "1") != "0":
    register_cuda_kernels()

__all__ = ["ENV_FLAG", "FAST_KERNELS", "cuda_module", "kernel_path", "register_cuda_kernels", "spmm",
           "unregister_cuda_kernels"]
