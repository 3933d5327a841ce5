"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models").

A weight's score is |W_ij| * ||X_j||, its magnitude times the L2 norm of input feature j over the
calibration tokens: the size of its contribution to the output. LLM activations carry a few input
features hundreds of times larger than the rest, which magnitude pruning ignores. Scores are compared
within each output row (each row loses the same share), which the paper found better for LLMs than
comparing across the layer. No weight update, one pass of statistics: fast, and close to SparseGPT
at 50%.
"""

from __future__ import annotations

import torch

from .patterns import Sparsity, lowest_score_mask


class FeatureNorms:
    """Running sum of squares of each input feature over the calibration tokens."""

    def __init__(self, in_features: int, device: torch.device):
        self.sum_squares = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum_squares += x.square().sum(dim=0)
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sum_squares.sqrt()


@torch.no_grad()
def wanda_prune_(weight: torch.Tensor, sparsity: Sparsity, feature_norms: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the lowest |W| * ||X_j|| of every row (or N:M group); returns the mask."""
    if feature_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"feature_norms must have shape ({weight.shape[1]},) for a weight of shape "
            f"{tuple(weight.shape)}, got {tuple(feature_norms.shape)}"
        )
    score = weight.abs().float() * feature_norms.to(weight.device, torch.float32)
    mask = lowest_score_mask(score, sparsity, per_row=True)
    weight.masked_fill_(mask, 0)
    return mask
