"""Finding the linear layers of a model, whatever class implements them.

Hugging Face GPT-2 style models use `transformers.pytorch_utils.Conv1D`, a linear layer whose weight
is stored transposed (in_features x out_features). Everything above this module sees every linear
layer as an (out_features x in_features) weight, as `nn.Linear` stores it.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import nn

FilterFn = Callable[[nn.Module, str], bool]


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out_features x in_features) weight, as a view: writing to it writes the module."""
    return module.weight.t() if is_conv1d(module) else module.weight


def head_modules(model: nn.Module) -> set[int]:
    """ids of the output embedding (LM head): it stays dense by default, as in SparseGPT and Wanda."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        if head is not None:
            heads.add(id(head))
    for name, module in model.named_modules():
        if name.split(".")[-1] == "lm_head":
            heads.add(id(module))
    return heads


def linear_layers(
    model: nn.Module, filter_fn: Optional[FilterFn] = None, include_head: bool = False
) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every linear layer `filter_fn` accepts, in module order.

    Without a filter, every `nn.Linear` and `Conv1D` except the LM head is taken.
    """
    heads = set() if include_head else head_modules(model)
    for name, module in model.named_modules():
        if filter_fn is not None:
            if filter_fn(module, name):
                yield name, module
        elif is_linear(module) and id(module) not in heads:
            yield name, module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
