"""The bitmap format's CUDA kernel (``cuda/bitmap_spmm.cu``, SpInfer style): each lane builds its
tensor-core fragment from the 64-bit block masks with a popcount. Launching is `cuda_op`'s job.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats.bitmap import GROUP_K, GROUP_M, MASK_BYTES_PER_TILE, BitmapWeight
from . import configs
from .cuda_op import DTYPES, CudaKernel, TensorSpec

FORMAT = "bitmap"
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
    expand_source="bitmap_expand.cu",
    expand_tiles=4,
)
fast_kernel = KERNEL.fast_kernel
# `weight.to_dense()` by cuda/bitmap_expand.cu: what products above MAX_FAST_N rows multiply.
expand = KERNEL.expand_weight

__all__ = ["DTYPES", "FORMAT", "KERNEL", "bitmap_linear", "check_inputs", "configs", "expand", "fast_kernel",
           "linear"]


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
