"""The bitmap format's CUDA kernel (``cuda/bitmap_spmm.cu``, SpInfer style): each lane builds its
tensor-core fragment from the 64-bit block masks with a popcount. Launching is `cuda_op`'s job.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats.bitmap import GROUP_K, GROUP_M, MASK_BYTES_PER_TILE, BitmapWeight
from . import configs, launch
from .cuda_op import DTYPES, CudaKernel, TensorSpec

FORMAT = "bitmap"


def expand_tensors(tensors: list[torch.Tensor], out_features: int, in_features: int,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense (out_features x in_features) weight of the bitmap tensors [masks, values, offsets],
    written by one launch of ``cuda/bitmap_expand.cu`` on torch's current stream (into `out` when
    given): what a product above MAX_FAST_N rows multiplies with cuBLAS (`configs.expand_enabled`)."""
    masks, values, offsets = tensors
    if values.dtype not in DTYPES or not values.is_cuda:
        raise TypeError(f"the bitmap expansion kernel takes CUDA float16 or bfloat16 values, got {values.dtype} "
                        f"on {values.device}")
    mt, kt = KERNEL.grid(out_features, in_features)
    if masks.numel() != mt * kt * MASK_BYTES_PER_TILE or offsets.numel() != mt * kt + 1:
        raise ValueError(f"bitmap masks/offsets do not match a ({out_features} x {in_features}) weight")
    for name, t in (("masks", masks), ("values", values), ("offsets", offsets)):
        if t.device != values.device or not t.is_contiguous():
            raise ValueError(f"bitmap {name} must be contiguous and on {values.device}")
        launch.check_aligned(f"bitmap {name}", t, 4)
    if out is None:
        dense = torch.empty(out_features, in_features, dtype=values.dtype, device=values.device)
    elif out.shape != (out_features, in_features) or out.dtype != values.dtype or out.device != values.device \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({out_features}, {in_features}) {values.dtype} tensor on "
                         f"{values.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    else:
        dense = out
    kernel = launch.get_kernel("bitmap_expand.cu", "flashllm_bitmap_expand", {}, values.dtype, values.device, 0,
                               threads=256)
    kernel.launch((mt * kt, 1, 1), [launch.ptr(masks), launch.ptr(values), launch.ptr(offsets), launch.ptr(dense),
                                    launch.i32(out_features), launch.i32(in_features), launch.i32(kt)],
                  launch.current_stream(values.device))
    return dense


def expand(weight: BitmapWeight, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`expand_tensors` on a `BitmapWeight`: its `to_dense()`, by the CUDA kernel."""
    return expand_tensors([weight.masks, weight.values, weight.offsets], *weight.shape, out=out)


KERNEL = CudaKernel(
    format=FORMAT,
    label="bitmap",
    source="bitmap_spmm.cu",
    kernel="flashllm_bitmap_spmm",
    tile=(GROUP_M, GROUP_K),
    tensors=(
        TensorSpec("masks", torch.uint8, lambda mt, kt: mt * kt * MASK_BYTES_PER_TILE, aligned=True),
        TensorSpec("values", None, aligned=True),
        TensorSpec("offsets", torch.int32, lambda mt, kt: mt * kt + 1),
    ),
    payload="values",
    runs="offsets",
    expand=expand_tensors,
)
fast_kernel = KERNEL.fast_kernel

__all__ = ["DTYPES", "FORMAT", "KERNEL", "bitmap_linear", "check_inputs", "configs", "expand", "expand_tensors",
           "fast_kernel", "linear"]


def check_inputs(x2d: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                 out_features: int, in_features: int, bias: Optional[torch.Tensor]) -> None:
    KERNEL.check_inputs(x2d, [masks, values, offsets], out_features, in_features, bias)


def bitmap_linear(x2d: torch.Tensor, masks: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                  out_features: int, in_features: int, bias: Optional[torch.Tensor] = None,
                  config: Optional[configs.LaunchConfig] = None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d @ W.T (+ bias)`` for a bitmap weight given by its tensors (see `CudaKernel.run`)."""
    return KERNEL.run(x2d, [masks, values, offsets], out_features, in_features, bias, config, out)


def linear(x2d: torch.Tensor, weight: BitmapWeight, bias: Optional[torch.Tensor] = None,
           config: Optional[configs.LaunchConfig] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`bitmap_linear` on a `BitmapWeight`."""
    return bitmap_linear(x2d, weight.masks, weight.values, weight.offsets, *weight.shape, bias, config, out)
