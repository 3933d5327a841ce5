"""OWL: outlier-weighted sparsity per decoder block (Yin et al., ICML 2024, "Outlier Weighed
Layerwise Sparsity: A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Uniform pruning gives every decoder block the same share of zeros, yet blocks differ in how many
*outliers* they hold: weights whose Wanda score |W_ij| * ||X_j|| is several times the block's
mean. Those carry much of what the model computes, and the paper found that the blocks with more
of them tolerate less pruning. OWL measures each block's outlier ratio (the share of its scores
above `threshold` times their mean, over all its pruned layers, on the dense model and the
calibration tokens), then spreads the blocks' densities linearly over a band of width 2 x `spread`
by that ratio, centred so that the mean sparsity stays the target: the block with the most outliers
keeps the most weights. The paper's defaults (threshold 5, spread 0.08) are ours; its gains are
largest at 60-80% sparsity, where uniform Wanda collapses. Then Wanda or SparseGPT prunes each
block to its own sparsity, as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .patterns import Sparsity

# Rows of |W| * ||X|| scored at a time when counting outliers (bounds the temporary).
ROWS_PER_STEP = 1024
NEEDS_CALIBRATION = ("OWL weighs blocks by Wanda scores from calibration data: use method 'wanda' or 'sparsegpt' "
                     "with owl")


@dataclass(frozen=True)
class OWL:
    """OWL's two hyperparameters: `threshold` (the paper's M: a score above `threshold` x the
    block's mean score is an outlier) and `spread` (its lambda: the blocks' densities span
    2 x `spread`, so their sparsities lie within target +- spread when the outlier ratios are
    spread evenly, and within target +- 2 x spread at worst)."""

    threshold: float = 5.0
    spread: float = 0.08

    def check(self, target: Sparsity) -> None:
        if target.is_nm:
            raise ValueError(f"OWL sets an unstructured sparsity per block; {target} is an N:M pattern, "
                             "the same in every layer by definition")
        if not self.threshold > 0:
            raise ValueError(f"OWL threshold must be positive, got {self.threshold}")
        if not 0 <= self.spread < 0.5:
            raise ValueError(f"OWL spread must lie in [0, 0.5), got {self.spread}")


class OutlierCount:
    """One block's Wanda scores: their sum, how many there are, and (`count`) how many lie above
    a threshold. Scores are formed a slice of rows at a time, never the whole block at once."""

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.total = 0.0
        self.numel = 0

    def add(self, weight: torch.Tensor, feature_norms: torch.Tensor) -> None:
        norms = feature_norms.to(weight.device, torch.float32)
        self.layers.append((weight, norms))
        # sum_ij |W_ij| n_j = (column sums of |W|) . n: no score matrix needed for the mean.
        self.total += float(weight.abs().sum(dim=0, dtype=torch.float32) @ norms)
        self.numel += weight.numel()

    def ratio(self, threshold: float) -> float:
        """The share of the block's scores above `threshold` x their mean."""
        if not self.numel:
            return 0.0
        cut = threshold * self.total / self.numel
        above = 0
        for weight, norms in self.layers:
            for start in range(0, weight.shape[0], ROWS_PER_STEP):
                rows = weight[start : start + ROWS_PER_STEP].abs().float()
                above += int((rows * norms > cut).sum())
        return above / self.numel


def block_sparsities(ratios: Sequence[float], target: float, spread: float) -> list[float]:
    """Each block's sparsity from its outlier ratio: densities spread linearly over 2 x `spread` by
    ratio, their mean kept at 1 - `target` (blocks with equal ratios, or one block: the target).
    Raises ValueError when a block would leave [0, 1): a smaller spread keeps them inside."""
    low, high = min(ratios), max(ratios)
    if high - low <= 0:
        return [target] * len(ratios)
    scaled = [(r - low) / (high - low) * 2 * spread for r in ratios]
    mean = sum(scaled) / len(scaled)
    out = [target - (s - mean) for s in scaled]
    if min(out) < 0 or max(out) >= 1:
        raise ValueError(f"OWL spread {spread} at sparsity {target} gives blocks sparsities from {min(out):.3f} "
                         f"to {max(out):.3f}, outside [0, 1); use a smaller spread")
    return out
