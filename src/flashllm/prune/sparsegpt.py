"""SparseGPT (Frantar & Alistarh, 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot").

Each layer is pruned to minimise ||WX - ŴX||² over the calibration inputs X. Removing weight q of a
row and updating the rest optimally is the Optimal Brain Surgeon step, which needs the inverse of
the Hessian H = 2XXᵀ/n (shared by every row, so computed once per layer). Columns are processed left
to right: a pruned column's error is spread over the columns to its right, which are then pruned in
turn, so only the upper Cholesky factor of H⁻¹ is needed. Updates inside a block of ``blocksize``
columns are applied column by column, those to the later columns once per block (lazy batch
updates, matrix products instead of outer products). The mask is chosen at the start of each block
from the weights as updated so far (adaptive mask selection), with the OBS score w² / [H⁻¹]_qq.
Damping keeps H invertible when the calibration tokens do not span every input direction. The paper
adds ``percdamp`` times the mean diagonal of H to every diagonal entry (``damping="mean"``); a few
outlier input features, which LLMs have, inflate that mean until the damping drowns the Hessian of
all the other features. The default (``"relative"``) adds ``percdamp`` times each entry itself: the
paper's damping after scaling every input feature to unit norm, which leaves the OBS scores and
updates otherwise unchanged, so the result no longer depends on the features' scales.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .patterns import Sparsity, lowest_k_mask, lowest_score_mask


class Hessian:
    """Running XᵀX over the calibration tokens of one layer input, in float32.

    XᵀX is symmetric, so only the blocks on and above the diagonal of a 4 x 4 grid of feature
    blocks are accumulated (10 of 16 products) and `matrix` mirrors them: 1.3-1.5x faster on a CPU
    for 576-1536 features, and exactly symmetric.
    """

    BLOCKS = 4
    MIN_BLOCK = 128  # narrower blocks lose more to small products than symmetry saves

    def __init__(self, in_features: int, device: torch.device):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.block = max(-(-in_features // self.BLOCKS), self.MIN_BLOCK)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n, b = x.shape[1], self.block
        for i in range(0, n, b):
            for j in range(i, n, b):
                self.xtx[i : i + b, j : j + b].addmm_(x[:, i : i + b].t(), x[:, j : j + b])
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        upper = self.xtx.triu()
        return (upper + upper.triu(1).t()) * (2.0 / max(self.tokens, 1))


DAMPING = ("relative", "mean")


def check_options(sparsity: Sparsity, blocksize: int, percdamp: float, damping: str) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    if sparsity.is_nm and blocksize % sparsity.m:
        raise ValueError(f"blocksize={blocksize} must be a multiple of M={sparsity.m} for the {sparsity} pattern")
    if not isinstance(percdamp, (int, float)) or not 0 < percdamp:
        raise ValueError(f"percdamp must be a positive number (0.01 is usual), got {percdamp!r}")
    if damping not in DAMPING:
        raise ValueError(f"damping must be one of {list(DAMPING)}, got {damping!r}")


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float, damping: str) -> torch.Tensor:
    """Upper Cholesky factor of the damped H⁻¹."""
    h = hessian.clone()
    if damping == "mean":
        h.diagonal().add_(percdamp * h.diagonal().mean())
    else:
        h.diagonal().mul_(1 + percdamp)
    # With J the order-reversing permutation and J H J = L Lᵀ, H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), and J L⁻¹ J
    # is upper triangular with a positive diagonal: it is the factor, from one Cholesky
    # decomposition and one triangular solve instead of two decompositions and an inverse.
    lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if info:
        raise ValueError(
            f"the damped Hessian is not positive definite (percdamp={percdamp}); raise percdamp "
            "or calibrate on more tokens"
        )
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


@contextmanager
def _one_cpu_thread(device: torch.device):
    # The column loop is thousands of small dependent ops: on CPU, splitting each across threads
    # costs more in synchronisation than it gains (measured 5-30x slower with 2 threads than with
    # 1 when other processes share the cores). The factorisation before it is one large operation
    # and keeps every thread (1.8x faster with 2 than with 1 on a 1536 x 1536 Hessian).
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def sparsegpt_prune_(
    weight: torch.Tensor,
    sparsity: Sparsity,
    hessian: torch.Tensor,
    blocksize: int = 128,
    percdamp: float = 0.01,
    damping: str = "relative",
) -> torch.Tensor:
    """Prune one (out x in) layer in place and update its remaining weights; returns the mask.

    The layer ends with exactly ``sparsity.zeros_in(weight.numel())`` pruned weights (or the N:M
    pattern in every group): each block of columns gets its share of the total, rounded so the
    shares add up.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must have shape ({cols}, {cols}) for a weight of shape {(rows, cols)}, got {tuple(hessian.shape)}")
    check_options(sparsity, blocksize, percdamp, damping)
    w = weight.float().clone()
    mask = _prune_columns(w, sparsity, hessian.to(w.device, torch.float32), blocksize, percdamp, damping)
    weight.copy_(w.to(weight.dtype))
    return mask


def _prune_columns(w: torch.Tensor, sparsity: Sparsity, hessian: torch.Tensor, blocksize: int, percdamp: float,
                   damping: str) -> torch.Tensor:
    rows, cols = w.shape
    h = hessian.clone()
    # An input that was always zero gives H a zero row; its weights never mattered on the
    # calibration data, so they get score 0 (pruned first) and H a unit diagonal to stay invertible.
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    hinv = _inverse_cholesky(h, percdamp, damping)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # The block's columns as rows: the column loop below then reads and writes contiguous
        # memory, two operations per column.
        w1 = w[:, i1:i2].t().contiguous()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()[:, None]
        alive = (~dead[i1:i2]).float()[:, None]
        if sparsity.is_nm:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            score = w1.square() / d.square() * alive
            k = sparsity.zeros_in(rows * i2) - sparsity.zeros_in(rows * i1)
            mask1 = lowest_k_mask(score.t(), k).t().contiguous()  # ties break in the weight's order
        # A column's error is (w - w_pruned) / d: w / d where pruned, and w / inf = 0 where kept.
        divisor = torch.where(mask1, d, torch.inf)
        with _one_cpu_thread(w.device):
            for i in range(i2 - i1):
                if sparsity.is_nm and i % sparsity.m == 0:
                    group = slice(i, i + sparsity.m)
                    score = w1[group].square() / d[group].square() * alive[group]
                    mask1[group] = lowest_score_mask(score.t(), sparsity, per_row=True).t()
                    divisor[group] = torch.where(mask1[group], d[group], torch.inf)
                torch.div(w1[i], divisor[i], out=err1[i])
                w1[i:].addr_(hinv1[i, i:], err1[i], alpha=-1)
        w1.masked_fill_(mask1, 0)  # exact zeros: w - (w / d) * d need not round to 0
        w[:, i1:i2] = w1.t()
        mask[:, i1:i2] = mask1.t()
        w[:, i2:].sub_(err1.t() @ hinv[i1:i2, i2:])
    return mask
