"""Shared-memory bank conflicts of the Tiled-CSL scatter: layout version 1's word order against
version 2's, counted on the CPU for random weights.

The kernel (cuda/tiled_csl_spmm.cu, `scatter_words`) has thread q of a tile's scatter load words
4q..4q+3 with one 16-byte load and store each as a 16-bit value into the zeroed shared tile at
its swizzled slot. A warp's store instruction c (0-3) thus writes words 4(32b + l) + c for its
32 lanes l: as many shared-memory wavefronts as the most words any one bank receives (two halves of
one 32-bit word are one access). Version 1 kept a tile's words in increasing location order, which
scatters them over banks about as badly as random placement; version 2 (formats/tiled_csl.py)
orders them round-robin over the 32 banks, one round per warp store, so every full round is one
store without conflicts.

    python scripts/csl_scatter_conflicts.py [--shape 1024x1024] [--sparsity 0.5,0.7,0.8,0.9]

Prints wavefronts per warp store (1 is conflict-free) for both orders.
"""

from __future__ import annotations

import argparse
import sys

import torch

from flashllm.formats.tiled_csl import SENTINEL_SLOT, TiledCSLWeight, location_of, split_words

LANES = 32
BANKS = 32


def location_ordered(slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each tile's slots in layout version 1's order: increasing location, sentinels last."""
    tile = torch.arange(offsets.numel() - 1).repeat_interleave(offsets.diff().to(torch.int64))
    location = torch.where(slots == SENTINEL_SLOT, SENTINEL_SLOT, location_of(slots))
    return slots[torch.argsort(tile * (2 * SENTINEL_SLOT) + location)]


def store_wavefronts(words: torch.Tensor, offsets: torch.Tensor) -> tuple[int, int]:
    """(wavefronts, warp store instructions) of scattering every tile's words as the kernel does;
    `words` are the 32-bit shared-memory words the values land in (slot >> 2)."""
    wavefronts = stores = 0
    for t in range(offsets.numel() - 1):
        tile = words[int(offsets[t]) : int(offsets[t + 1])]
        quads = tile.numel() // 4
        for first in range(0, quads, LANES):
            lanes = torch.arange(first, min(first + LANES, quads))
            for component in range(4):
                word = tile[4 * lanes + component]
                bank = word % BANKS
                # distinct words per bank: the most any bank serves is the number of wavefronts
                pairs = torch.unique(bank * (1 << 20) + word)
                wavefronts += int(torch.bincount(pairs // (1 << 20), minlength=BANKS).max())
                stores += 1
    return wavefronts, stores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1024x1024")
    parser.add_argument("--sparsity", default="0.5,0.7,0.8,0.9")
    args = parser.parse_args(argv)
    rows, cols = (int(v) for v in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    print(f"Tiled-CSL scatter, {rows} x {cols} random weight: shared-memory wavefronts per warp store")
    print(f"{'sparsity':>8s} {'stores':>7s} {'v1: locations':>15s} {'v2: round-robin':>17s}")
    for sparsity in (float(s) for s in args.sparsity.split(",")):
        dense = torch.randn(rows, cols, generator=gen)
        dense[torch.rand(rows, cols, generator=gen) < sparsity] = 0
        weight = TiledCSLWeight.from_dense(dense.half())
        _, slots = split_words(weight.words, torch.float16)
        version_1, stores = store_wavefronts(location_ordered(slots, weight.offsets) >> 2, weight.offsets)
        version_2, _ = store_wavefronts(slots >> 2, weight.offsets)
        print(f"{sparsity:8.0%} {stores:7d} {version_1 / stores:15.2f} {version_2 / stores:17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
