"""flashllm: unstructured-sparse LLM weights, loaded compressed and computed dense.

    import flashllm
    flashllm.prune_(model, 0.5)                      # write zeros (magnitude, wanda, sparsegpt; owl=True)
    summary = flashllm.sparsify_(model, "bitmap")    # swap nn.Linear for SparseLinear
    y = flashllm.spmm(x, flashllm.BitmapWeight.from_dense(w))
"""

__version__ = "0.1.0"

from .checkpoint import convert_checkpoint, from_pretrained, save_pretrained
from .data import calibration_data, default_text
from .evaluate import perplexity
from .formats import FORMATS, BitmapWeight, FormatError, SparseWeight, TiledCSL16Weight, TiledCSLWeight, get_format
from .kernels import spmm
from .nn import SparseLinear, SparsifySummary, sparsify_
from .prune import OWL, PruneSummary, prune_

__all__ = [
    "FORMATS",
    "BitmapWeight",
    "FormatError",
    "OWL",
    "PruneSummary",
    "SparseLinear",
    "SparseWeight",
    "SparsifySummary",
    "TiledCSL16Weight",
    "TiledCSLWeight",
    "__version__",
    "calibration_data",
    "convert_checkpoint",
    "default_text",
    "from_pretrained",
    "get_format",
    "perplexity",
    "prune_",
    "save_pretrained",
    "sparsify_",
    "spmm",
]
