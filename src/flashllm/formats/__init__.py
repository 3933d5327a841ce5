"""Compressed weight formats: dense (pruned) weight in, exact round trip out."""

import torch

from .base import SUPPORTED_DTYPES, FormatError, SparseWeight
from .bitmap import BitmapWeight
from .tiled_csl import TiledCSLWeight
from .tiled_csl16 import TiledCSL16Weight

FORMATS: dict[str, type[SparseWeight]] = {cls.name: cls for cls in (BitmapWeight, TiledCSLWeight, TiledCSL16Weight)}

# "auto" packs each layer in the format whose GPU kernel was faster at its sparsity. On an H200
# (BENCHMARKS.md, thirteenth session: 18 LLM layers, N = 1-16, geomean speedup over cuBLAS) bitmap
# led at 70% (1.04x against Tiled-CSL's 1.00x) and Tiled-CSL from 80% (1.14x against 1.08x; at 90%
# 1.46x against 1.08x). Bitmap is the smaller at every sparsity (at 80%: 26% of dense against 40%).
AUTO = "auto"
TILED_CSL_FROM = 0.78  # a little under 80%: a layer pruned to 80% by any method lands at or above it


def get_format(name: str) -> type[SparseWeight]:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown sparse format {name!r}; choose one of {sorted(FORMATS)}") from None


def check_format_name(name: str) -> str:
    """`name` if it names a format or "auto", else a ValueError listing the choices."""
    if name != AUTO and name not in FORMATS:
        raise ValueError(f"unknown sparse format {name!r}; choose one of {sorted(FORMATS) + [AUTO]}")
    return name


def format_for(name: str, weight: torch.Tensor) -> type[SparseWeight]:
    """The format class `name` names; for "auto", the faster one at this pruned weight's sparsity."""
    if check_format_name(name) != AUTO:
        return FORMATS[name]
    sparsity = 1.0 - int(torch.count_nonzero(weight)) / max(weight.numel(), 1)
    return TiledCSLWeight if sparsity >= TILED_CSL_FROM else BitmapWeight


__all__ = ["AUTO", "FORMATS", "SUPPORTED_DTYPES", "BitmapWeight", "FormatError", "SparseWeight", "TiledCSL16Weight",
           "TiledCSLWeight", "check_format_name", "format_for", "get_format"]

FORMATS_BY_CODE: dict[int, type[SparseWeight]] = {cls.format_code: cls for cls in FORMATS.values()}
