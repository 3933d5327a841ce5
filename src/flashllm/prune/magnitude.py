"""Magnitude pruning: drop the smallest |w|. No data needed; collapses large models at 50%."""

from __future__ import annotations

import torch

from .patterns import Sparsity, lowest_score_mask


@torch.no_grad()
def magnitude_prune_(weight: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Zero, in place, the smallest-magnitude weights of one (out x in) layer; returns the mask."""
    mask = lowest_score_mask(weight.abs().float(), sparsity, per_row=False)
    # masked_fill writes +0.0; multiplying by a 0/1 mask would leave -0.0 for negative weights.
    weight.masked_fill_(mask, 0)
    return mask
