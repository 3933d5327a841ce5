"""Choosing the next token from logits, greedy or sampled, without a host sync.

`flashllm.decode.StaticDecoder` replays each decode step as a CUDA graph, so whatever picks the
next token must run on the device with fixed shapes and never read a value back to the host.
Sampling here draws by the Gumbel-max trick (the argmax of the logits plus Gumbel noise is a draw
from their softmax) after the same temperature, top-k and nucleus (top-p) filtering as Hugging
Face's warpers; `torch.rand` inside a captured graph draws fresh numbers at every replay (torch
advances its generator's offset), and `torch.manual_seed` before decoding makes a run repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Sampling:
    """Sampling settings, applied in Hugging Face's order: `temperature` > 0 divides the logits,
    `top_k` (None: off) keeps the k most likely tokens, `top_p` in (0, 1] then keeps the smallest
    set of most likely tokens whose probabilities sum to at least `top_p`."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None), got {self.top_k}")


def filtered_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """`logits` (float32) divided by the temperature, -inf outside the top-k and the top-p nucleus."""
    scaled = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scaled.shape[-1]:
        kth = scaled.topk(sampling.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if sampling.top_p >= 1:
        return scaled
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    # A token leaves the nucleus when the tokens above it already hold top_p: the most likely one
    # always stays.
    outside = (probs.cumsum(dim=-1) - probs) >= sampling.top_p
    return scaled.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


def next_tokens(logits: torch.Tensor, sampling: Optional[Sampling] = None) -> torch.Tensor:
    """The next token of each row of `logits` (batch, vocab) as (batch, 1): the argmax, or with
    `sampling` a draw from the filtered softmax."""
    if sampling is None:
        return logits.argmax(dim=-1, keepdim=True)
    filtered = filtered_logits(logits, sampling)
    uniform = torch.rand(filtered.shape, device=filtered.device)
    # -log(-log(u)): Gumbel noise; u = 0 gives -inf (never chosen), and rand never returns 1.
    return (filtered - torch.log(-torch.log(uniform))).argmax(dim=-1, keepdim=True)
