"""Compressed weight formats: dense (pruned) weight in, exact round trip out."""

from .base import SUPPORTED_DTYPES, FormatError, SparseWeight
from .bitmap import BitmapWeight
from .tiled_csl import TiledCSLWeight

FORMATS: dict[str, type[SparseWeight]] = {cls.name: cls for cls in (BitmapWeight, TiledCSLWeight)}


def get_format(name: str) -> type[SparseWeight]:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown sparse format {name!r}; choose one of {sorted(FORMATS)}") from None


__all__ = ["FORMATS", "SUPPORTED_DTYPES", "BitmapWeight", "FormatError", "SparseWeight", "TiledCSLWeight", "get_format"]

FORMATS_BY_CODE: dict[int, type[SparseWeight]] = {cls.format_code: cls for cls in FORMATS.values()}
