"""Tiled-CSL, Flash-LLM's format: each non-zero stored with its location inside its tile.

Bytes per weight element, dense fp16 being 2: ``(1 - s) * 4`` at sparsity ``s``, i.e. 2.0 at 50%
(no saving), 1.2 at 70%, 0.4 at 90%. It pays only from 50% sparsity; it is the format the original
Flash-LLM kernel reads, and the smaller one above about 94% sparsity.

Unlike the published kernel, which sizes its shared-memory buffer for half a tile and so silently
drops values in tiles denser than 50%, every tile density from 0 to 100% is stored and decoded.

Layout version 2 (everything a kernel must know lives in this block):

* The weight (M x K) is zero-padded to multiples of a 128 x 64 tile; tiles are stored row-major
  over the grid, so the tiles of one 128-row strip follow each other along K.
* ``words``: per tile, its non-zeros. For fp16 and bf16 a word is an int32 holding the value's
  16 bits in the low half and its *slot* in the high half, so one 128-bit load brings four complete
  non-zeros; for fp32 it is an int64 built the same way from 32-bit halves. The slot of the element
  at row ``r``, column ``c`` of the tile (location ``l = r * 64 + c``) is the byte offset of its
  16-bit value in the kernels' shared-memory tile, whose 16-byte chunks are swizzled by row:
  ``2 * (l ^ ((l >> 3) & 0x38))`` (`slot_of`), so a kernel stores each value at the address the
  word gives, with no arithmetic. Each tile's run is padded to a multiple of 4 words with
  *sentinel* words (value 0, slot 16384 = one past the tile), which a kernel scatters into a spare
  shared-memory slot instead of branching.
* Within a tile the non-zeros are ordered for the kernels' scatter, in which thread q of a tile
  stores words 4q..4q+3 and a warp's store instruction c thus writes words 4(32b + l) + c of its
  32 lanes l: round-robin over the 32 shared-memory banks of their slots (``(slot >> 2) % 32``;
  each bank's first word in slot order, then each bank's second, ...), round i of 32 words placed
  as component i % 4 of threads 32 (i // 4) .. 32 (i // 4) + 31 within each group of 128 words, so
  every full round is one store without bank conflicts (Flash-LLM orders its words ahead of time
  for the same reason); a tile's last, partial group of 128 keeps the round-robin order, and the
  sentinels come last. Any order decodes the same; readers may not assume one.
* ``offsets``: int32, one per tile plus one, the start of each tile's run in ``words``.

Version 1 stored the location ``l`` itself, in increasing order; such files are converted when
read (`upgrade_state`).

``nbytes = word * sum_t ceil4(nnz_t) + 4 * (tiles + 1) + 40`` with ``word`` 4 bytes (8 for fp32),
``nnz_t`` the non-zeros of tile ``t``, ``ceil4`` rounding up to a multiple of 4, and 40 bytes of header.

All of this but the tile's shape and the slot function is shared with `tiled_csl16`, a smaller
tile whose slots address a fragment-ordered shared tile: `WordLayout` names what differs,
`TiledWordsWeight` and `bank_ordered_words` do the rest for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from .base import (
    MAX_STORED_ELEMENTS,
    FormatError,
    SparseWeight,
    cast_finite,
    ceil_to,
    check_dense_weight,
    check_offsets,
    expect_tensor,
    pack_aligned,
    pad_2d,
)

TILE_M = 128
TILE_K = 64
TILE_ELEMS = TILE_M * TILE_K
SENTINEL = TILE_ELEMS  # the location one past the tile
SENTINEL_SLOT = 2 * TILE_ELEMS  # its slot: the spare 16-bit slot after the shared tile
WORD_ALIGN = 4
BANKS = 32  # shared-memory banks of 4 bytes
ROUND = 32  # words one warp store writes
GROUP = WORD_ALIGN * ROUND  # words of one pass of 32 threads (4 per thread)

# value bits type, word type
_HALF_TYPES = {
    torch.float16: (torch.int16, torch.int32),
    torch.bfloat16: (torch.int16, torch.int32),
    torch.float32: (torch.int32, torch.int64),
}


def make_words(values: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    return _words(values.view(_HALF_TYPES[values.dtype][0]), locations)


def _words(bits: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
    """Words of value bits (int16, or int32 for fp32) in the low half and `fields` in the high."""
    word = torch.int32 if bits.dtype == torch.int16 else torch.int64
    return torch.stack([bits, fields.to(bits.dtype)], dim=1).view(word).reshape(-1)


def slot_of(locations: torch.Tensor) -> torch.Tensor:
    """Slots (byte offsets in the swizzled shared tile) of locations ``r * 64 + c``; the sentinel's
    is SENTINEL_SLOT."""
    return 2 * (locations ^ ((locations >> 3) & 0x38))


def location_of(slots: torch.Tensor) -> torch.Tensor:
    """Locations of slots: `slot_of` undone (the swizzle is its own inverse)."""
    half = slots >> 1
    return half ^ ((half >> 3) & 0x38)


@dataclass(frozen=True)
class WordLayout:
    """What a Tiled-CSL-style format decides for itself (`tiled_csl`, `tiled_csl16`): the tile's
    shape and the slot of each location. Everything else is shared: the words, their bank order,
    the sentinel padding, the offsets. `slot_of` must map the tile's locations one-to-one onto the
    even byte offsets below `sentinel_slot` (so every bank holds ``tile_elems / 32`` slots) and the
    location one past the tile (`tile_elems`) to `sentinel_slot`; `location_of` undoes it."""

    tile_m: int
    tile_k: int
    slot_of: Callable[[torch.Tensor], torch.Tensor]
    location_of: Callable[[torch.Tensor], torch.Tensor]
    # The last, partial group of 128 words: kept in round-robin order (False: tiled_csl version 2),
    # or its first 4 m words (m = its words // 4) placed column-wise, word k as component k // m of
    # lane k % m, so that each of its 4 stores takes m consecutive words of the round-robin order
    # (different banks, but where a round ends) instead of words 4 apart (up to 4 rounds, 2-4 way
    # conflicts); the last words and the sentinels follow as before.
    spread_tail: bool = False

    @property
    def tile_elems(self) -> int:
        return self.tile_m * self.tile_k

    @property
    def sentinel_slot(self) -> int:
        """The spare 16-bit slot one past the shared tile."""
        return 2 * self.tile_elems

    def grid(self, shape: tuple[int, int]) -> tuple[int, int]:
        return ceil_to(shape[0], self.tile_m) // self.tile_m, ceil_to(shape[1], self.tile_k) // self.tile_k

    def to_storage_order(self, padded: torch.Tensor) -> torch.Tensor:
        tm, tk = padded.shape[0] // self.tile_m, padded.shape[1] // self.tile_k
        return padded.reshape(tm, self.tile_m, tk, self.tile_k).transpose(1, 2).reshape(tm * tk, self.tile_elems)

    def from_storage_order(self, tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        tm, tk = grid
        return (tiles.reshape(tm, tk, self.tile_m, self.tile_k).transpose(1, 2)
                .reshape(tm * self.tile_m, tk * self.tile_k))


LAYOUT = WordLayout(TILE_M, TILE_K, slot_of, location_of)
to_storage_order, from_storage_order, _grid = LAYOUT.to_storage_order, LAYOUT.from_storage_order, LAYOUT.grid
# Elements one pass of `bank_ordered_words` lays out (4096 tiles of 128 x 64), and one pass of
# `_repeated_slots` counts (1024 such tiles).
ELEMS_PER_PASS = 4096 * TILE_ELEMS
ELEMS_PER_COUNT = 1024 * TILE_ELEMS


def _bank_major(device: torch.device, layout: WordLayout = LAYOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """(locations, their slots) of a tile listed bank by bank, each bank's in slot order."""
    locations = torch.arange(layout.tile_elems, device=device)
    slots = layout.slot_of(locations)
    order = torch.argsort(((slots >> 2) % BANKS) * layout.sentinel_slot + slots)
    return locations[order], slots[order]


def bank_ordered_words(bits: torch.Tensor, keep: torch.Tensor, tiles_per_pass: int | None = None,
                       layout: WordLayout = LAYOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """(words, offsets) of tiles given densely, in the word order of the module docstring: `bits`
    (tiles, ``layout.tile_elems``) the value bits (int16, or int32 for fp32) at each location,
    `keep` which are non-zeros. Each tile's words in round-robin order over the banks of their
    slots (``layout.slot_of``), placed for the scatter, then padded with sentinels. Dense per tile
    rather than sorted: a few passes over the tiles, done `tiles_per_pass` tiles at a time (by
    default ELEMS_PER_PASS elements), so the temporaries stay ~20 bytes per element of one pass
    (~0.7 GB) however large the layer (an OPT-175B layer built on the GPU holds 74k 128 x 64 tiles)."""
    if keep.shape[1] != layout.tile_elems:
        raise ValueError(f"tiles of {keep.shape[1]} elements given for a layout of {layout.tile_elems}")
    if tiles_per_pass is None:
        tiles_per_pass = ELEMS_PER_PASS // layout.tile_elems
    if keep.shape[0] > tiles_per_pass:
        parts = [_bank_ordered_pass(bits[t : t + tiles_per_pass], keep[t : t + tiles_per_pass], layout)
                 for t in range(0, keep.shape[0], tiles_per_pass)]
        sizes = [int(w.numel()) for w, _ in parts]
        if sum(sizes) > MAX_STORED_ELEMENTS:
            raise ValueError(f"the weight stores {sum(sizes)} words, more than int32 offsets can index "
                             f"({MAX_STORED_ELEMENTS}); split the layer")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        offsets = torch.cat([parts[0][1][:1]] + [o[1:] + start for (_, o), start in zip(parts, starts)])
        return torch.cat([w for w, _ in parts]), offsets
    return _bank_ordered_pass(bits, keep, layout)


def _bank_ordered_pass(bits: torch.Tensor, keep: torch.Tensor,
                       layout: WordLayout) -> tuple[torch.Tensor, torch.Tensor]:
    tiles, device = keep.shape[0], keep.device
    tile_elems = layout.tile_elems
    per_bank = tile_elems // BANKS  # slots of one bank in a tile (the slots cover the tile's words)
    locations, slots = _bank_major(device, layout)
    keep_bm = keep[:, locations].view(tiles, BANKS, per_bank)
    bank_counts = keep_bm.sum(2, dtype=torch.int32)  # (tiles, banks)
    rank = keep_bm.cumsum(2, dtype=torch.int32)  # 1-based rank of each kept word in its bank
    # Round r holds the rank-r word of every bank with more than r words, in bank order.
    active = bank_counts[:, :, None] > torch.arange(per_bank, dtype=torch.int32, device=device)
    before = active.cumsum(1, dtype=torch.int32)  # banks up to and including this one still active
    per_round = before[:, -1, :]
    round_start = per_round.cumsum(1, dtype=torch.int32) - per_round
    # The kept words, bank by bank; flat indices into the tiles (1-D gathers are the fast ones).
    flat = torch.nonzero(keep_bm.view(-1)).squeeze(1)
    if tiles * tile_elems < 2**31:  # half the bytes of every pass below
        flat = flat.to(torch.int32)
    tile, within = flat // tile_elems, flat % tile_elems
    bank = within // per_bank
    r = rank.view(-1).index_select(0, flat).to(flat.dtype) - 1
    seq = (round_start.view(-1).index_select(0, tile * per_bank + r)
           + before.view(-1).index_select(0, (tile * BANKS + bank) * per_bank + r) - 1)  # in round-robin order
    counts = bank_counts.sum(1, dtype=torch.int64)
    full = (counts // GROUP * GROUP).to(flat.dtype).index_select(0, tile)
    rnd, lane = seq // ROUND, seq % ROUND
    place = torch.where(seq < full, WORD_ALIGN * (ROUND * (rnd // WORD_ALIGN) + lane) + rnd % WORD_ALIGN, seq)
    if layout.spread_tail:
        tail = seq - full  # position in the partial group (negative in the full ones)
        columns = ((counts % GROUP) // WORD_ALIGN).to(flat.dtype).index_select(0, tile)  # its lanes with 4 words
        spread = (tail >= 0) & (tail < WORD_ALIGN * columns)
        lanes = columns.clamp(min=1)
        place = torch.where(spread, full + WORD_ALIGN * (tail % lanes) + tail // lanes, place)
    place += (torch.cumsum(counts, 0) - counts).to(flat.dtype).index_select(0, tile)
    value_bits = bits.reshape(-1).index_select(0, tile * tile_elems + locations.index_select(0, within))
    kept = _words(value_bits, slots.index_select(0, within))
    nonzero_words = torch.empty_like(kept)
    nonzero_words[place] = kept
    sentinel = layout.sentinel_slot << (8 * bits.element_size())  # value bits 0 in the low half
    return pack_aligned(counts, nonzero_words, WORD_ALIGN, sentinel)


def split_words(words: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Words -> (values in `dtype`, int64 slots)."""
    half, _ = _HALF_TYPES[dtype]
    pair = words.view(half).reshape(-1, 2)
    return pair[:, 0].contiguous().view(dtype), pair[:, 1].to(torch.int64)


class TiledWordsWeight(SparseWeight):
    """What the Tiled-CSL formats share (`TiledCSLWeight`, `tiled_csl16.TiledCSL16Weight`): words
    of value bits and slots, in the bank order of `bank_ordered_words`, runs padded with sentinels
    to WORD_ALIGN words, and int32 offsets. A subclass names its `layout`."""

    layout: ClassVar[WordLayout]
    tensor_names = ("words", "offsets")

    words: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "TiledWordsWeight":
        weight = check_dense_weight(weight)
        layout = cls.layout
        tm, tk = layout.grid(weight.shape)
        tiles = layout.to_storage_order(pad_2d(weight, tm * layout.tile_m, tk * layout.tile_k))
        words, offsets = bank_ordered_words(tiles.view(_HALF_TYPES[weight.dtype][0]), tiles != 0, layout=layout)
        return cls(tuple(weight.shape), weight.dtype, words=words, offsets=offsets)

    def to_dense(self) -> torch.Tensor:
        layout = self.layout
        values, slots = split_words(self.words, self.dtype)
        tile_of_word = torch.arange(self.offsets.numel() - 1, device=self.words.device)
        # output_size: the total is known, so no device-to-host sync (CUDA graphs can capture this)
        tile_of_word = tile_of_word.repeat_interleave(self.offsets.diff().to(torch.int64),
                                                      output_size=self.words.numel())
        # One spare slot per tile takes the sentinel words, as the kernel's shared memory does.
        stride = layout.tile_elems + 1
        tiles = torch.zeros((self.offsets.numel() - 1) * stride, dtype=self.dtype, device=self.words.device)
        tiles[tile_of_word * stride + layout.location_of(slots)] = values
        dense = layout.from_storage_order(tiles.view(-1, stride)[:, : layout.tile_elems], layout.grid(self.shape))
        return dense[: self.shape[0], : self.shape[1]]

    @property
    def nnz(self) -> int:
        _, slots = split_words(self.words, self.dtype)
        return int((slots != self.layout.sentinel_slot).sum())

    def _cast_values(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        values, slots = split_words(self.words, self.dtype)
        return {"words": make_words(cast_finite(values, dtype, self.name), slots), "offsets": self.offsets}

    def _validate(self) -> None:
        layout, name = self.layout, self.name
        tm, tk = layout.grid(self.shape)
        words = expect_tensor(self, "words", _HALF_TYPES[self.dtype][1])
        offsets = expect_tensor(self, "offsets", torch.int32, tm * tk + 1)
        if words.device != offsets.device:
            raise FormatError(f"{name} tensors are on different devices")
        steps = check_offsets(self, offsets, words.numel(), WORD_ALIGN)
        values, slots = split_words(words, self.dtype)
        if bool(((slots < 0) | (slots > layout.sentinel_slot) | (slots % 2 != 0)).any()):
            raise FormatError(f"{name} slots fall outside the {layout.tile_m}x{layout.tile_k} tile (corrupted data)")
        real = slots != layout.sentinel_slot
        tile_of_word = torch.arange(tm * tk, device=words.device).repeat_interleave(steps, output_size=words.numel())
        # Within a tile: the non-zeros in any order, each slot once, then only sentinels, fewer
        # than one vector of them.
        first_word = offsets.to(torch.int64)
        real_before = F.pad(real.cumsum(0), (1, 0))
        real_per_tile = real_before[first_word[1:]] - real_before[first_word[:-1]]
        if (bool((real_per_tile > layout.tile_elems).any())
                or _repeated_slots(first_word, tile_of_word, slots, real, tile_elems=layout.tile_elems)):
            raise FormatError(f"{name} slots are repeated within a tile (corrupted data)")
        sentinels_before = F.pad((~real).cumsum(0), (1, 0))
        after_sentinel = sentinels_before[:-1] - sentinels_before[first_word[:-1]][tile_of_word] > 0
        if (bool((real & after_sentinel).any()) or bool((steps - real_per_tile >= WORD_ALIGN).any())
                or bool(((values != 0) & ~real).any())):
            raise FormatError(f"{name} padding is malformed (corrupted data)")
        if not bool(torch.isfinite(values).all()):
            raise FormatError(f"{name} values hold inf or NaN (corrupted data)")
        if tm * layout.tile_m != self.shape[0] or tk * layout.tile_k != self.shape[1]:  # else there is no padding
            locations = layout.location_of(slots)
            rows = tile_of_word // tk * layout.tile_m + locations // layout.tile_k
            cols = tile_of_word % tk * layout.tile_k + locations % layout.tile_k
            if bool((real & ((rows >= self.shape[0]) | (cols >= self.shape[1]))).any()):
                raise FormatError(f"{name} stores non-zeros in the padding (corrupted data)")


class TiledCSLWeight(TiledWordsWeight):
    name = "tiled_csl"
    format_code = 1
    version = 2
    upgradable_versions = (1,)
    layout = LAYOUT

    @classmethod
    def upgrade_state(cls, version: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Version-1 tensors (locations in increasing order within a tile) in version 2's layout;
        the result is validated as any version-2 data."""
        words, offsets = state.get("words"), state.get("offsets")
        if not isinstance(words, torch.Tensor) or not isinstance(offsets, torch.Tensor):
            return state  # reported as missing by the caller
        if words.dtype not in (torch.int32, torch.int64) or offsets.dtype != torch.int32 or offsets.numel() < 1:
            raise FormatError("tiled_csl version-1 tensors have the wrong dtypes (corrupted data)")
        steps = offsets.to(torch.int64).diff()
        if int(offsets[0]) != 0 or int(offsets[-1]) != words.numel() or bool((steps < 0).any()):
            raise FormatError("tiled_csl version-1 offsets do not span the words (truncated or corrupted data)")
        half = torch.int16 if words.dtype == torch.int32 else torch.int32
        pair = words.view(half).reshape(-1, 2)
        bits, locations = pair[:, 0], pair[:, 1].to(torch.int64)
        if bool(((locations < 0) | (locations > SENTINEL)).any()):
            raise FormatError(f"tiled_csl locations fall outside the {TILE_M}x{TILE_K} tile (corrupted data)")
        tile_of = torch.arange(steps.numel(), device=words.device).repeat_interleave(steps)
        real = locations != SENTINEL
        # Densely per tile (the layout is decided there), one spare column for the sentinels.
        dense_bits = torch.zeros(steps.numel(), TILE_ELEMS + 1, dtype=half, device=words.device)
        keep = torch.zeros(steps.numel(), TILE_ELEMS + 1, dtype=torch.bool, device=words.device)
        dense_bits[tile_of, locations] = bits
        keep[tile_of[real], locations[real]] = True
        if int(keep.sum()) != int(real.sum()):
            raise FormatError("tiled_csl version-1 locations are repeated within a tile (corrupted data)")
        new_words, new_offsets = bank_ordered_words(dense_bits[:, :TILE_ELEMS], keep[:, :TILE_ELEMS])
        return {**state, "words": new_words, "offsets": new_offsets}


def _repeated_slots(first_word: torch.Tensor, tile_of_word: torch.Tensor, slots: torch.Tensor,
                    real: torch.Tensor, tiles_per_pass: int | None = None, tile_elems: int = TILE_ELEMS) -> bool:
    """Whether a tile holds a slot twice; counted a bounded number of tiles at a time (by default
    ELEMS_PER_COUNT slots: a count per slot of the whole weight would take 8 bytes per weight
    element)."""
    if tiles_per_pass is None:
        tiles_per_pass = ELEMS_PER_COUNT // tile_elems
    tiles = first_word.numel() - 1
    for t0 in range(0, tiles, tiles_per_pass):
        lo, hi = int(first_word[t0]), int(first_word[min(t0 + tiles_per_pass, tiles)])
        keep = real[lo:hi]
        key = (tile_of_word[lo:hi][keep] - t0) * tile_elems + (slots[lo:hi][keep] >> 1)
        if key.numel() and int(torch.bincount(key).max()) > 1:
            return True
    return False
