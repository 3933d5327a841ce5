"""What "sparsity" can mean: a fraction of zeros per layer, or an N:M pattern."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Sparsity:
    """Either ``fraction`` zeros per layer (unstructured) or N non-zeros in every M consecutive inputs."""

    fraction: float
    n: Optional[int] = None
    m: Optional[int] = None

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    def zeros_in(self, numel: int) -> int:
        return int(round(self.fraction * numel))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:.0%}"


def parse_sparsity(value: float | str) -> Sparsity:
    """0.5, "0.5", "50%" or "2:4"; a fraction must lie in [0, 1)."""
    if isinstance(value, str):
        text = value.strip()
        nm = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if not 0 < n < m:
                raise ValueError(f"N:M pattern {text!r} needs 0 < N < M (N non-zeros kept in every M weights)")
            return Sparsity(1 - n / m, n, m)
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(f"sparsity {text!r} is neither a fraction like 0.5 nor a pattern like 2:4") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"sparsity must be a number in [0, 1) or an N:M pattern, got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {value} (1 would delete the layer)")
    return Sparsity(float(value))


def check_nm_shape(sparsity: Sparsity, in_features: int, name: str) -> None:
    if sparsity.is_nm and in_features % sparsity.m != 0:
        raise ValueError(
            f"layer {name!r} has in_features={in_features}, not a multiple of {sparsity.m}, so it "
            f"cannot hold the {sparsity} pattern; exclude it with filter_fn"
        )


def check_finite_weight(name: str, weight: torch.Tensor) -> torch.Tensor:
    """`weight`, once it is known to hold no NaN or inf (which no score can rank)."""
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"layer {name!r} holds NaN or inf weights; pruning needs finite weights")
    return weight


def lowest_score_mask(score: torch.Tensor, sparsity: Sparsity, per_row: bool) -> torch.Tensor:
    """Bool mask of the weights to zero: the lowest scores, per layer, per row, or per N:M group.

    Per row, each row loses ``round(s * numel) // rows`` weights and some rows one more, so the
    layer's count is exact as well. Ties break by position (as a stable sort orders them), so the
    counts are exact and the result deterministic. NaN scores raise.
    """
    _check_scores(score)
    rows, cols = score.shape
    if sparsity.is_nm:
        groups = score.reshape(rows, cols // sparsity.m, sparsity.m)
        drop = groups.argsort(dim=-1, stable=True)[..., : sparsity.m - sparsity.n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
        return mask.reshape(rows, cols)
    if per_row:
        # Every row loses k weights and the `extra` rows whose next-lowest score is lowest lose one
        # more, so the layer total is exact too (rows * round(s * cols) would drift from it).
        total = sparsity.zeros_in(score.numel())
        k, extra = divmod(total, rows)
        mask = _lowest_k(score, k)
        if extra:
            # Each row's next candidate: the first weight, by position, holding its (k+1)-th score.
            next_score = score.kthvalue(k + 1, dim=1).values
            candidates = ((score == next_score[:, None]) & ~mask).int().argmax(dim=1)
            chosen = next_score.argsort(stable=True)[:extra]
            mask[chosen, candidates[chosen]] = True
        return mask
    return _lowest_k(score.reshape(1, -1), sparsity.zeros_in(score.numel())).view(score.shape)


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask, shaped like ``score``, of its ``k`` lowest entries; ties break by position."""
    _check_scores(score)
    return _lowest_k(score.reshape(1, -1), k).view(score.shape)


def _check_scores(score: torch.Tensor) -> None:
    if bool(score.isnan().any()):
        raise ValueError("pruning scores hold NaN: the weights or the calibration statistics hold NaN or inf")


def _lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest entries of each row, ties broken by position, as a stable sort would pick them.

    A selection (kthvalue) finds each row's k-th score in linear time where a sort takes n log n:
    everything below it goes, and of the entries equal to it the first few by position.
    """
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    kth = _kth_smallest(score, k)
    below = score < kth
    at = score == kth
    wanted = k - below.sum(dim=1, keepdim=True)
    return below | (at & (at.cumsum(dim=1) <= wanted))


# CUDA's kthvalue selects each row in one thread block: a whole layer as one row (45 M scores for
# Llama-2-7B's up_proj) then takes a large fraction of a second, where a device-wide sort takes
# milliseconds (pytorch/pytorch#75599: 0.68 s against 0.03 s for 1e8 values). The sort costs
# values plus int64 indices, 12 bytes per score, for as long as the selection runs.
_SORT_ROW_MIN = 1 << 20


def _kth_smallest(score: torch.Tensor, k: int, by_sort: Optional[bool] = None) -> torch.Tensor:
    """Each row's k-th smallest score (1-based), shaped (rows, 1)."""
    if by_sort is None:
        by_sort = score.is_cuda and score.shape[0] < 64 and score.shape[1] >= _SORT_ROW_MIN
    if by_sort:
        return score.sort(dim=1).values[:, k - 1 : k]
    return score.kthvalue(k, dim=1, keepdim=True).values
