"""Shared-memory bank conflicts of the Tiled-CSL scatter, now and with the words reordered ahead of
time (Flash-LLM's trick), counted on the CPU for random weights.

The kernel (cuda/tiled_csl_spmm.cu, `scatter_words`) has thread q of a tile's scatter load words
4q..4q+3 with one 16-byte load and store each as a 16-bit value into the zeroed shared tile at
its swizzled location. A warp's store instruction c (0-3) thus writes words 4(32b + l) + c for its
32 lanes l: as many shared-memory wavefronts as the most words any one bank receives (two halves of
one 32-bit word are one access). The format keeps a tile's words in increasing location order,
which scatters them over banks about as badly as random placement. Since every word carries its
own location, any order decodes the same: sorting a tile's words round-robin over the 32 banks
(each bank's first word, then each bank's second, ...) and laying round r of 32 out as component
r % 4 of the 32 threads r // 4 makes every full round one conflict-free store.

    python scripts/csl_scatter_conflicts.py [--shape 4096x4096] [--sparsity 0.5,0.7,0.8,0.9]

Prints wavefronts per warp store (1 is conflict-free) for both orders; a layout change, not yet
made (docs/kernels.md, "Where the next kernel should go").
"""

from __future__ import annotations

import argparse
import sys

import torch

from flashllm.formats.tiled_csl import SENTINEL, TiledCSLWeight, split_words

LANES = 32
BANKS = 32


def shared_words(locations: torch.Tensor) -> torch.Tensor:
    """The 32-bit shared-memory word each location's half lands in (the kernel's `swizzle`)."""
    loc = locations.clamp(max=SENTINEL)
    return (loc ^ ((loc >> 3) & 0x38)) >> 1


def store_wavefronts(words: torch.Tensor, offsets: torch.Tensor) -> tuple[int, int]:
    """(wavefronts, warp store instructions) of scattering every tile's words as the kernel does."""
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


def bank_ordered(words: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each tile's shared words reordered round-robin over banks, rounds laid out so that one warp
    store takes one round; a tile's last partial group of 128 stays in round-robin order."""
    out = words.clone()
    for t in range(offsets.numel() - 1):
        lo, hi = int(offsets[t]), int(offsets[t + 1])
        tile = words[lo:hi]
        bank = tile % BANKS
        order = torch.argsort(bank * (1 << 20) + tile, stable=True)  # by bank, then location
        sorted_bank = bank[order]
        first_of_bank = torch.searchsorted(sorted_bank, torch.arange(BANKS))
        rank = torch.arange(tile.numel()) - first_of_bank[sorted_bank]
        sequence = tile[order][torch.argsort(rank * BANKS + sorted_bank, stable=True)]
        full = (tile.numel() // (4 * LANES)) * 4 * LANES
        i = torch.arange(full)
        r, j = i // LANES, i % LANES
        place = 4 * (LANES * (r // 4) + j) + r % 4
        laid = sequence.clone()
        laid[place] = sequence[:full]
        out[lo:hi] = laid
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1024x1024")
    parser.add_argument("--sparsity", default="0.5,0.7,0.8,0.9")
    args = parser.parse_args(argv)
    rows, cols = (int(v) for v in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    print(f"Tiled-CSL scatter, {rows} x {cols} random weight: shared-memory wavefronts per warp store")
    print(f"{'sparsity':>8s} {'stores':>7s} {'location order':>15s} {'bank round-robin':>17s}")
    for sparsity in (float(s) for s in args.sparsity.split(",")):
        dense = torch.randn(rows, cols, generator=gen)
        dense[torch.rand(rows, cols, generator=gen) < sparsity] = 0
        weight = TiledCSLWeight.from_dense(dense.half())
        _, locations = split_words(weight.words, torch.float16)
        words = shared_words(locations)
        now, stores = store_wavefronts(words, weight.offsets)
        reordered, _ = store_wavefronts(bank_ordered(words, weight.offsets), weight.offsets)
        print(f"{sparsity:8.0%} {stores:7d} {now / stores:15.2f} {reordered / stores:17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
