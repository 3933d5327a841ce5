"""flashllm: unstructured-sparse LLM weights, loaded compressed and computed dense.

    import flashllm
    flashllm.prune_(model, 0.5)                      # write zeros (magnitude, wanda, sparsegpt)
    summary = flashllm.sparsify_(model, "bitmap")    # swap nn.Linear for SparseLinear
    y = flashllm.spmm(x, flashllm.BitmapWeight.from_dense(w))
"""

__version__ = "0.1.0"

from .checkpoint import convert_checkpoint, from_pretrained, save_pretrained
from .formats import FORMATS, BitmapWeight, FormatError, SparseWeight, TiledCSLWeight, get_format
from .kernels import spmm
from .nn import SparseLinear, SparsifySummary, sparsify_
from .prune import PruneSummary, prune_

__all__ = [
    "FORMATS",
    "BitmapWeight",
    "FormatError",
    "PruneSummary",
    "SparseLinear",
    "SparseWeight",
    "SparsifySummary",
    "TiledCSLWeight",
    "__version__",
    "convert_checkpoint",
    "from_pretrained",
    "get_format",
    "prune_",
    "save_pretrained",
    "sparsify_",
    "spmm",
]
