"""The tiled_csl16 format's CUDA kernel (``cuda/tiled_csl16_spmm.cu``): Tiled-CSL with 16 x 64
tiles, each streamed, scattered and multiplied by one warp that never waits for the block's other
warps (written in the twentieth session; compiled and emulated, not yet run on a GPU, so the
first-use check guards every variant). Launching is `cuda_op`'s job.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats.tiled_csl16 import TILE_K, TILE_M, TiledCSL16Weight
from . import configs, tiled_csl_cuda
from .cuda_op import DTYPES, CudaKernel

FORMAT = "tiled_csl16"
KERNEL = CudaKernel(
    format=FORMAT,
    label="tiled_csl16",
    source="tiled_csl16_spmm.cu",
    kernel="flashllm_tiled_csl16_spmm",
    tile=(TILE_M, TILE_K),
    tensors=tiled_csl_cuda.KERNEL.tensors,  # Tiled-CSL's words and offsets, on this format's tile grid
    payload="words",
    expand_source="tiled_csl16_expand.cu",
    expand_tiles=8,
)
fast_kernel = KERNEL.fast_kernel
# `weight.to_dense()` by cuda/tiled_csl16_expand.cu: what products above MAX_FAST_N rows multiply.
expand = KERNEL.expand_weight

__all__ = ["DTYPES", "FORMAT", "KERNEL", "configs", "expand", "fast_kernel", "linear"]


def linear(x2d: torch.Tensor, weight: TiledCSL16Weight, bias: Optional[torch.Tensor] = None,
           config: Optional[configs.LaunchConfig] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d @ W.T (+ bias)`` for a `TiledCSL16Weight` (see `CudaKernel.run`)."""
    return KERNEL.run(x2d, [weight.words, weight.offsets], *weight.shape, bias, config, out)
