"""Pruning: write zeros into a dense model's linear layers. Packing them is `sparsify_`'s job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn
from tqdm.auto import tqdm

from ..layers import FilterFn, dense_weight, is_linear, linear_layers
from .magnitude import magnitude_prune_
from .patterns import Sparsity, check_nm_shape, parse_sparsity

METHODS = ("magnitude",)


@dataclass
class PruneSummary:
    method: str
    sparsity: str
    layers: list[str] = field(default_factory=list)
    zeros: int = 0
    weights: int = 0
    seconds: float = 0.0

    @property
    def achieved(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0

    def __str__(self) -> str:
        return (
            f"{self.method} {self.sparsity}: {len(self.layers)} layers, "
            f"{self.achieved:.2%} of {self.weights:,} weights are zero ({self.seconds:.1f} s)"
        )


def prune_(
    model: nn.Module,
    sparsity: float | str,
    method: str = "magnitude",
    filter_fn: Optional[FilterFn] = None,
    progress: bool = True,
) -> PruneSummary:
    """Zero weights of every linear layer except the LM head, in place, layer by layer.

    ``sparsity`` is a fraction in [0, 1) of each layer's weights, or an N:M pattern such as "2:4"
    (N non-zeros kept in every M consecutive input weights of a row).
    """
    import time

    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {list(METHODS)}")
    target = parse_sparsity(sparsity)
    layers = _prunable_layers(model, filter_fn, target)
    summary = PruneSummary(method, str(target))
    start = time.perf_counter()
    for name, module in tqdm(layers, desc=f"pruning ({method})", disable=not progress):
        weight = dense_weight(module)
        magnitude_prune_(weight.data, target)
        _record(summary, name, weight)
    summary.seconds = time.perf_counter() - start
    return summary


def _prunable_layers(model: nn.Module, filter_fn: Optional[FilterFn], target: Sparsity):
    layers = list(linear_layers(model, filter_fn))
    if not layers:
        raise ValueError("the model has no linear layers to prune (or filter_fn selected none)")
    for name, module in layers:
        if not is_linear(module):
            raise TypeError(f"filter_fn selected {name!r}, a {type(module).__name__}, which is not a linear layer")
        check_nm_shape(target, dense_weight(module).shape[1], name)
    return layers


def _record(summary: PruneSummary, name: str, weight) -> None:
    summary.layers.append(name)
    summary.zeros += int((weight == 0).sum())
    summary.weights += weight.numel()


__all__ = ["METHODS", "PruneSummary", "Sparsity", "parse_sparsity", "prune_"]
