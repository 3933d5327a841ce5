"""Perplexity of a causal LM over a text, with a sliding window.

Hugging Face's strided recipe: windows of ``max_length`` tokens start every ``stride`` tokens, and
only the tokens a window adds beyond the previous one are scored, each with up to
``max_length - stride`` tokens of context before it. Every token after the first is scored exactly
once, so the result does not depend on how the text splits into windows beyond the context each
token sees. A shorter stride gives more context and a lower perplexity, at proportionally more cost.
The model is called like any Hugging Face causal LM, so dense, pruned and packed models all work.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

DEFAULT_MAX_LENGTH = 1024


def _context_length(model: nn.Module) -> Optional[int]:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    max_length: Optional[int] = None,
    stride: Optional[int] = None,
    progress: bool = True,
) -> float:
    """exp(mean negative log-likelihood) of ``text``'s tokens under ``model``.

    ``max_length`` defaults to 1024 tokens (or the model's context, when shorter), ``stride`` to
    half of ``max_length``. The model runs on its own device, in eval mode, without gradients.
    """
    context = _context_length(model)
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, context or DEFAULT_MAX_LENGTH)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer of at least 2 tokens, got {max_length!r}")
    if context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds the model's context of {context} tokens")
    if stride is None:
        stride = max(1, max_length // 2)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise ValueError(f"stride must be an integer in [1, max_length={max_length}], got {stride!r}")

    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"the text has {ids.numel()} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    nll, scored, prev_end = 0.0, 0, 0
    # Windows until one reaches the last token, so the progress bar's total is the work done.
    windows = 1 + -(-max(ids.numel() - max_length, 0) // stride)
    try:
        for begin in tqdm(range(0, windows * stride, stride), desc="perplexity", disable=not progress):
            end = min(begin + max_length, ids.numel())
            window = ids[begin:end].to(device)
            # Position p predicts token p + 1; score only targets this window adds.
            first = max(prev_end, begin + 1) - begin
            kept = window.numel() - first + 1
            # The LM head only for the positions scored: half its work at the default stride.
            extra = {"logits_to_keep": kept} if keeps_logits else {}
            logits = model(window.unsqueeze(0), use_cache=False, **extra).logits[0, -kept:]
            log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
            targets = window[first:]
            nll -= float(log_probs.gather(1, targets.unsqueeze(1)).double().sum())
            scored += targets.numel()
            prev_end = end
    finally:
        model.train(was_training)
    return math.exp(nll / scored)


__all__ = ["DEFAULT_MAX_LENGTH", "perplexity"]
