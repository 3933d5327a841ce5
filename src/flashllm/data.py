"""Calibration and evaluation text that needs no download: the Python documentation's topics.

Every Python ships ``pydoc_data.topics``, about 460,000 characters of reference prose and code (the
help() pages on statements, types and special methods), so pruning and perplexity work offline and
reproducibly. Its content changes a little between Python versions: report the version with any
number measured on it. Whole topics are held out for evaluation, so no calibration window ever
overlaps the evaluation text.
"""

from __future__ import annotations

from typing import Optional

import torch

SPLITS = ("calibration", "evaluation")
HELD_OUT_SHARE = 0.1
_SEPARATOR = "\n\n"


def _topic_splits() -> dict[str, list[str]]:
    from pydoc_data.topics import topics

    # Walking the topics in name order and holding one out whenever the held-out share falls below
    # 10% spreads the evaluation text over the whole documentation instead of one alphabetic slice.
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    seen = held_out = 0
    for name in sorted(topics):
        text = topics[name]
        if held_out < HELD_OUT_SHARE * seen:
            splits["evaluation"].append(text)
            held_out += len(text)
        else:
            splits["calibration"].append(text)
        seen += len(text)
    return splits


def default_text(split: str = "calibration") -> str:
    """The calibration (about 90%) or evaluation (about 10%) part of ``pydoc_data.topics``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return _SEPARATOR.join(_topic_splits()[split])


def calibration_data(
    tokenizer,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    text: Optional[str] = None,
) -> torch.Tensor:
    """``nsamples`` non-overlapping windows of ``seqlen`` token ids, a LongTensor (nsamples, seqlen).

    The windows are drawn at random (reproducibly for a ``seed``) from ``text``, by default the
    calibration split of `default_text`.
    """
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if text is None:
        text = default_text("calibration")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = len(ids) // seqlen
    if windows < nsamples:
        raise ValueError(
            f"the calibration text has {len(ids):,} tokens, room for {windows} non-overlapping "
            f"windows of {seqlen} tokens, but {nsamples} were requested ({nsamples * seqlen:,} "
            "tokens): use a longer text, fewer samples or shorter sequences"
        )
    generator = torch.Generator().manual_seed(seed)
    # A random shift of the window grid lets different seeds cut the text at different places.
    shift = int(torch.randint(len(ids) - windows * seqlen + 1, (), generator=generator))
    chosen = torch.randperm(windows, generator=generator)[:nsamples]
    ids = torch.tensor(ids[shift : shift + windows * seqlen], dtype=torch.long).view(windows, seqlen)
    return ids[chosen].clone()


__all__ = ["HELD_OUT_SHARE", "SPLITS", "calibration_data", "default_text"]
