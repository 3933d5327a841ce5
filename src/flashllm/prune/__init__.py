"""Pruning: write zeros into a dense model's linear layers. Packing them is `sparsify_`'s job.

Three methods, as in the papers: ``magnitude`` (no data), ``wanda`` (|W| times the input-feature
norm, per output row) and ``sparsegpt`` (OBS weight updates from the calibration Hessian). The last
two run calibration token ids through the model block by block (see `sequential`), and can give each
decoder block its own sparsity by its share of outlier weights (``owl=True``, see `owl`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import FilterFn, dense_weight, is_linear, linear_layers
from .magnitude import magnitude_prune_
from .owl import NEEDS_CALIBRATION, OWL, OutlierCount, block_sparsities
from .patterns import Sparsity, check_finite_weight, check_nm_shape, parse_sparsity
from .sequential import BlockHook, prune_sequentially
from .sparsegpt import Hessian, check_options, sparsegpt_prune_
from .wanda import FeatureNorms, wanda_prune_

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATION_HINT = (
    "token ids, a LongTensor of shape (nsamples, seqlen); build one with "
    "flashllm.data.calibration_data(tokenizer, nsamples=128, seqlen=512)"
)


@dataclass
class PruneSummary:
    method: str
    sparsity: str
    layers: list[str] = field(default_factory=list)
    zeros: int = 0
    weights: int = 0
    seconds: float = 0.0
    calibration_samples: int = 0
    calibration_seqlen: int = 0
    block_sparsity: list[float] = field(default_factory=list)  # per decoder block, with OWL

    @property
    def achieved(self) -> float:
        return self.zeros / self.weights if self.weights else 0.0

    @property
    def calibration_tokens(self) -> int:
        return self.calibration_samples * self.calibration_seqlen

    def __str__(self) -> str:
        calibrated = (
            f", calibrated on {self.calibration_samples} x {self.calibration_seqlen} tokens"
            if self.calibration_tokens else ""
        )
        owl = (
            f", OWL: {min(self.block_sparsity):.1%} to {max(self.block_sparsity):.1%} per block"
            if self.block_sparsity else ""
        )
        return (
            f"{self.method} {self.sparsity}: {len(self.layers)} layers, "
            f"{self.achieved:.2%} of {self.weights:,} weights are zero{owl} ({self.seconds:.1f} s{calibrated})"
        )


def prune_(
    model: nn.Module,
    sparsity: float | str,
    method: str = "magnitude",
    *,
    calibration: Optional[torch.Tensor] = None,
    filter_fn: Optional[FilterFn] = None,
    progress: bool = True,
    batch_size: int = 8,
    blocksize: int = 128,
    percdamp: float = 0.01,
    damping: str = "relative",
    owl: bool | OWL = False,
) -> PruneSummary:
    """Zero weights of every linear layer except the LM head, in place, layer by layer.

    ``sparsity`` is a fraction in [0, 1) of each layer's weights, or an N:M pattern such as "2:4"
    (N non-zeros kept in every M consecutive input weights of a row). ``wanda`` and ``sparsegpt``
    need ``calibration``, token ids of shape (nsamples, seqlen) (`flashllm.data.calibration_data`),
    run through the model ``batch_size`` sequences at a time on the model's device; ``magnitude``
    ignores it. ``blocksize`` is SparseGPT's lazy-update block width; its Hessian is damped by
    ``percdamp`` of each diagonal entry (``damping="relative"``) or of the mean diagonal (``"mean"``,
    as in the paper, which outlier input features can swamp). ``owl=True`` (or an `OWL` with its
    threshold and spread) gives each decoder block its own unstructured sparsity, the mean staying
    ``sparsity``, by its share of outlier weights (one more calibration pass, on the dense model).
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {list(METHODS)}")
    target = parse_sparsity(sparsity)
    layers = _prunable_layers(model, filter_fn, target)
    summary = PruneSummary(method, str(target))
    start = time.perf_counter()
    if method == "magnitude":
        if owl:
            raise ValueError(NEEDS_CALIBRATION)
        for name, module in tqdm(layers, desc=f"pruning ({method})", disable=not progress):
            magnitude_prune_(check_finite_weight(name, dense_weight(module).data), target)
            _record(summary, name, module)
    else:
        calibrated_prune_(model, layers, target, method, calibration, summary, progress=progress,
                          batch_size=batch_size, blocksize=blocksize, percdamp=percdamp, damping=damping,
                          owl=owl)
    summary.seconds = time.perf_counter() - start
    return summary


def calibrated_prune_(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    target: Sparsity,
    method: str,
    calibration: Optional[torch.Tensor],
    summary: PruneSummary,
    *,
    progress: bool,
    batch_size: int,
    blocksize: int,
    percdamp: float,
    damping: str,
    enter_block: Optional[BlockHook] = None,
    leave_block: Optional[BlockHook] = None,
    owl: bool | OWL = False,
    release_block: Optional[BlockHook] = None,
) -> None:
    """Wanda or SparseGPT over `layers`, block by block (the block hooks go to `prune_sequentially`).
    With `owl`, a first pass over the dense model sets each block's sparsity; it calls
    `enter_block` and then `release_block` (instead of `leave_block`) on each block."""
    _check_calibration(model, method, calibration, batch_size)
    if method == "sparsegpt":
        check_options(target, blocksize, percdamp, damping)
    options = OWL() if owl is True else owl or None
    if options is not None and not isinstance(options, OWL):
        raise TypeError(f"owl must be True, False or a flashllm.OWL, got {owl!r}")
    if options is not None:
        options.check(target)
    per_layer: dict[str, Sparsity] = {}

    def prune_layer(name: str, module: nn.Module, statistic) -> None:
        weight = check_finite_weight(name, dense_weight(module).data)
        layer_target = per_layer.get(name, target)
        if method == "wanda":
            wanda_prune_(weight, layer_target, statistic.norms())
        else:
            sparsegpt_prune_(weight, layer_target, statistic.matrix(), blocksize, percdamp, damping)
        _record(summary, name, module)

    make_statistic = FeatureNorms if method == "wanda" else Hessian
    was_training = model.training
    model.eval()
    try:
        if options is not None:
            per_layer, summary.block_sparsity = _owl_sparsities(
                model, layers, target, options, calibration, batch_size, progress, enter_block, release_block)
        prune_sequentially(model, layers, calibration, make_statistic, prune_layer, batch_size,
                           progress, f"pruning ({method} {target})", enter_block, leave_block)
    finally:
        model.train(was_training)
    summary.calibration_samples, summary.calibration_seqlen = calibration.shape


def _owl_sparsities(model, layers, target: Sparsity, owl: OWL, calibration, batch_size: int, progress: bool,
                    enter_block: Optional[BlockHook], release_block: Optional[BlockHook]):
    """(layer name -> its block's sparsity, the blocks' sparsities in order), from each block's
    outlier ratio on the dense model (nothing is pruned in this pass)."""
    block_of: dict[str, int] = {}
    ratios: dict[int, float] = {}
    current = [-1, OutlierCount()]  # the block being calibrated, its scores

    def enter(i: int, block: nn.Module) -> None:
        current[:] = [i, OutlierCount()]
        if enter_block is not None:
            enter_block(i, block)

    def score(name: str, module: nn.Module, statistic: FeatureNorms) -> None:
        current[1].add(check_finite_weight(name, dense_weight(module).data), statistic.norms())
        block_of[name] = current[0]

    def leave(i: int, block: nn.Module) -> None:
        count, current[1] = current[1], OutlierCount()  # drop the block's weights before releasing it
        if count.numel:
            ratios[i] = count.ratio(owl.threshold)
        if release_block is not None:
            release_block(i, block)

    prune_sequentially(model, layers, calibration, FeatureNorms, score, batch_size, progress,
                       f"OWL: outlier ratios (threshold {owl.threshold:g})", enter, leave)
    order = sorted(ratios)
    sparsity = dict(zip(order, block_sparsities([ratios[i] for i in order], target.fraction, owl.spread)))
    return {name: Sparsity(sparsity[i]) for name, i in block_of.items()}, [sparsity[i] for i in order]


def _check_calibration(model: nn.Module, method: str, calibration, batch_size: int) -> None:
    if calibration is None:
        raise ValueError(f"method {method!r} needs calibration data: {CALIBRATION_HINT}")
    if not isinstance(calibration, torch.Tensor) or calibration.dtype not in (torch.int64, torch.int32):
        kind = calibration.dtype if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise TypeError(f"calibration must be {CALIBRATION_HINT}; got {kind}")
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError(f"calibration must be {CALIBRATION_HINT}; got shape {tuple(calibration.shape)}")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and calibration.shape[1] > context:
        raise ValueError(
            f"calibration sequences of {calibration.shape[1]} tokens exceed the model's context of {context} tokens"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _prunable_layers(model: nn.Module, filter_fn: Optional[FilterFn], target: Sparsity):
    layers = list(linear_layers(model, filter_fn))
    if not layers:
        raise ValueError("the model has no linear layers to prune (or filter_fn selected none)")
    for name, module in layers:
        if not is_linear(module):
            raise TypeError(f"filter_fn selected {name!r}, a {type(module).__name__}, which is not a linear layer")
        check_nm_shape(target, dense_weight(module).shape[1], name)
    return layers


def _record(summary: PruneSummary, name: str, module: nn.Module) -> None:
    weight = dense_weight(module)
    summary.layers.append(name)
    summary.zeros += int((weight == 0).sum())
    summary.weights += weight.numel()


__all__ = ["METHODS", "OWL", "PruneSummary", "Sparsity", "parse_sparsity", "prune_"]
