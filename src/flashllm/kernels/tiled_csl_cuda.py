"""The Tiled-CSL format's CUDA kernel (``cuda/tiled_csl_spmm.cu``, Flash-LLM style): each tile's
non-zeros are scattered into a zeroed shared-memory tile, double-buffered against the tensor cores.
Launching is `cuda_op`'s job.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats.tiled_csl import TILE_K, TILE_M, TiledCSLWeight
from . import configs
from .cuda_op import DTYPES, CudaKernel, TensorSpec

FORMAT = "tiled_csl"
KERNEL = CudaKernel(
    format=FORMAT,
    label="Tiled-CSL",
    source="tiled_csl_spmm.cu",
    kernel="flashllm_tiled_csl_spmm",
    tile=(TILE_M, TILE_K),
    tensors=(
        TensorSpec("words", torch.int32, aligned=True),
        TensorSpec("offsets", torch.int32, lambda mt, kt: mt * kt + 1),
    ),
    payload="words",
    expand_source="tiled_csl_expand.cu",
)
fast_kernel = KERNEL.fast_kernel
# `weight.to_dense()` by cuda/tiled_csl_expand.cu: what products above MAX_FAST_N rows multiply.
expand = KERNEL.expand_weight

__all__ = ["DTYPES", "FORMAT", "KERNEL", "check_inputs", "configs", "expand", "fast_kernel", "linear",
           "tiled_csl_linear"]


def check_inputs(x2d: torch.Tensor, words: torch.Tensor, offsets: torch.Tensor, out_features: int,
                 in_features: int, bias: Optional[torch.Tensor]) -> None:
    KERNEL.check_inputs(x2d, [words, offsets], out_features, in_features, bias)


def tiled_csl_linear(x2d: torch.Tensor, words: torch.Tensor, offsets: torch.Tensor, out_features: int,
                     in_features: int, bias: Optional[torch.Tensor] = None,
                     config: Optional[configs.LaunchConfig] = None,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d @ W.T (+ bias)`` for a Tiled-CSL weight given by its tensors (see `CudaKernel.run`)."""
    return KERNEL.run(x2d, [words, offsets], out_features, in_features, bias, config, out)


def linear(x2d: torch.Tensor, weight: TiledCSLWeight, bias: Optional[torch.Tensor] = None,
           config: Optional[configs.LaunchConfig] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`tiled_csl_linear` on a `TiledCSLWeight`."""
    return tiled_csl_linear(x2d, weight.words, weight.offsets, *weight.shape, bias, config, out)
