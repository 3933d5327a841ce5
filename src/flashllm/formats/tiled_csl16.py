"""Tiled-CSL16: Tiled-CSL's words on 16 x 64 tiles, whose slots address a shared tile laid out in
tensor-core fragment order, so that one warp decodes a tile and reads it back with 16-byte loads.

Bytes per weight element, dense fp16 being 2: about ``(1 - s) * 4 + 0.01`` at sparsity ``s``, as
`tiled_csl` plus a little more padding and offsets (the tiles are 8 times smaller).

Layout version 1 (everything a kernel must know lives in this block):

* The weight (M x K) is zero-padded to multiples of a 16 x 64 tile; tiles are stored row-major over
  the grid, so the tiles of one 16-row strip follow each other along K.
* ``words``: per tile, its non-zeros, encoded as `tiled_csl`'s: for fp16 and bf16 an int32 with the
  value's 16 bits in the low half and its *slot* in the high half, for fp32 an int64 made the same
  way of 32-bit halves.
* The slot of the element at row ``r`` (0-15), column ``c`` (0-63) of a tile (location
  ``l = r * 64 + c``) is the byte offset of its 16-bit value in the kernel's 2 KB shared tile,
  whose order is that of the ``mma.m16n8k16`` B fragments with the tile's rows as the N dimension:
  row ``r`` is column ``g = r & 7`` of row half ``h = r >> 3``; column ``c`` is element
  ``kk = c & 15`` of k16 step ``s = c >> 4``, held by thread ``t = (kk & 7) >> 1`` of its quad as
  half ``e = kk & 1`` of register ``hi = kk >> 3``. Lane ``4 g + t`` owns 16 contiguous bytes per
  half and pair of k16 steps ``q = s >> 1``, in which the element is half ``j = 4 (s & 1) + 2 hi + e``:

      slot = 1024 h + 512 q + 16 (4 g + t) + 2 j                                 (`slot_of`)

  so each lane fetches the B registers of two k16 steps with one 16-byte load, and the slots of a
  tile are exactly the even byte offsets 0 .. 2046 (`location_of` inverts `slot_of`). Each tile's
  run is padded to a multiple of 4 words with *sentinel* words (value 0, slot 2048 = one past the
  shared tile), which a kernel scatters into a spare slot instead of branching.
* Within a tile the words are ordered for the kernel's warp scatter, in which lane l loads words
  4 (32 i + l) .. 4 (32 i + l) + 3 (one 16-byte load) in pass i and its store instruction c writes
  word 4 (32 i + l) + c: round-robin over the 32 shared-memory banks of their slots
  (``(slot >> 2) % 32``; each bank's first word in slot order, then each bank's second, ...), round
  k of 32 words placed as component k % 4 of lanes 32 (k // 4) .. 32 (k // 4) + 31 of each group
  of 128 words, so every full round is one store without bank conflicts. This is `tiled_csl`'s
  order (`tiled_csl.bank_ordered_words`) with this tile and slot function, except for a tile's
  last, partial group of 128, which here holds a third or more of a tile's words (77 of about 205 at
  80%): of its ``n`` words the first ``4 m`` (``m = n // 4``) continue the round-robin order
  column-wise, word ``k`` as component ``k // m`` of lane ``k % m``, so each of the group's 4 stores
  takes ``m`` consecutive words of that order (different banks, except where a round ends) rather
  than words 4 apart; the last ``n % 4`` words, then the sentinels, come after them. Any order
  decodes the same; readers may not assume one.
* ``offsets``: int32, one per tile plus one, the start of each tile's run in ``words``.

``nbytes = word * sum_t ceil4(nnz_t) + 4 * (tiles + 1) + 40`` with ``word`` 4 bytes (8 for fp32),
``nnz_t`` the non-zeros of tile ``t``, ``ceil4`` rounding up to a multiple of 4, and 40 bytes of header.
"""

from __future__ import annotations

import torch

from .tiled_csl import WORD_ALIGN, TiledWordsWeight, WordLayout, bank_ordered_words, make_words, split_words

TILE_M = 16
TILE_K = 64
TILE_ELEMS = TILE_M * TILE_K
SENTINEL = TILE_ELEMS  # the location one past the tile
SENTINEL_SLOT = 2 * TILE_ELEMS  # its slot: the spare 16-bit slot after the 2 KB shared tile


def slot_of(locations: torch.Tensor) -> torch.Tensor:
    """Slots (byte offsets in the fragment-ordered shared tile) of locations ``r * 64 + c``; the
    sentinel's (`SENTINEL`) is SENTINEL_SLOT."""
    r, c = locations >> 6, locations & 63
    s, kk = c >> 4, c & 15
    lane = 4 * (r & 7) + ((kk & 7) >> 1)
    j = 4 * (s & 1) + 2 * (kk >> 3) + (kk & 1)
    return 1024 * (r >> 3) + 512 * (s >> 1) + 16 * lane + 2 * j


def location_of(slots: torch.Tensor) -> torch.Tensor:
    """Locations of slots: `slot_of` undone; SENTINEL_SLOT gives SENTINEL."""
    h, q, lane, j = slots >> 10, (slots >> 9) & 1, (slots >> 4) & 31, (slots >> 1) & 7
    r = 8 * h + (lane >> 2)
    c = 16 * (2 * q + (j >> 2)) + 8 * ((j >> 1) & 1) + 2 * (lane & 3) + (j & 1)
    return r * TILE_K + c


LAYOUT = WordLayout(TILE_M, TILE_K, slot_of, location_of, spread_tail=True)
to_storage_order, from_storage_order = LAYOUT.to_storage_order, LAYOUT.from_storage_order


class TiledCSL16Weight(TiledWordsWeight):
    name = "tiled_csl16"
    format_code = 3
    version = 1
    upgradable_versions = ()
    layout = LAYOUT


__all__ = ["LAYOUT", "SENTINEL", "SENTINEL_SLOT", "TILE_ELEMS", "TILE_K", "TILE_M", "WORD_ALIGN", "TiledCSL16Weight",
           "bank_ordered_words", "from_storage_order", "location_of", "make_words", "slot_of", "split_words",
           "to_storage_order"]
