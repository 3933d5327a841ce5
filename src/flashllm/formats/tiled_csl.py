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
"""

from __future__ import annotations

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


def _grid(shape: tuple[int, int]) -> tuple[int, int]:
    return ceil_to(shape[0], TILE_M) // TILE_M, ceil_to(shape[1], TILE_K) // TILE_K


def to_storage_order(padded: torch.Tensor) -> torch.Tensor:
    tm, tk = padded.shape[0] // TILE_M, padded.shape[1] // TILE_K
    return padded.reshape(tm, TILE_M, tk, TILE_K).transpose(1, 2).reshape(tm * tk, TILE_ELEMS)


def from_storage_order(tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    tm, tk = grid
    return tiles.reshape(tm, tk, TILE_M, TILE_K).transpose(1, 2).reshape(tm * TILE_M, tk * TILE_K)


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


PER_BANK = TILE_ELEMS // BANKS  # slots of one bank in a tile


def _bank_major(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(locations, their slots) of a tile listed bank by bank, each bank's in slot order."""
    locations = torch.arange(TILE_ELEMS, device=device)
    slots = slot_of(locations)
    order = torch.argsort(((slots >> 2) % BANKS) * (2 * TILE_ELEMS) + slots)
    return locations[order], slots[order]


def bank_ordered_words(bits: torch.Tensor, keep: torch.Tensor,
                       tiles_per_pass: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(words, offsets) of tiles given densely, in layout version 2 (module docstring): `bits`
    (tiles, 8192) the value bits (int16, or int32 for fp32) at each location, `keep` which are
    non-zeros. Each tile's words in round-robin order over the banks, placed for the scatter, then
    padded with sentinels. Dense per tile rather than sorted: a few passes over the tiles, done
    `tiles_per_pass` tiles at a time, so the temporaries stay ~20 bytes per element of one pass
    (~0.7 GB) however large the layer (an OPT-175B layer built on the GPU holds 74k tiles)."""
    if keep.shape[0] > tiles_per_pass:
        parts = [_bank_ordered_pass(bits[t : t + tiles_per_pass], keep[t : t + tiles_per_pass])
                 for t in range(0, keep.shape[0], tiles_per_pass)]
        sizes = [int(w.numel()) for w, _ in parts]
        if sum(sizes) > MAX_STORED_ELEMENTS:
            raise ValueError(f"the weight stores {sum(sizes)} words, more than int32 offsets can index "
                             f"({MAX_STORED_ELEMENTS}); split the layer")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        offsets = torch.cat([parts[0][1][:1]] + [o[1:] + start for (_, o), start in zip(parts, starts)])
        return torch.cat([w for w, _ in parts]), offsets
    return _bank_ordered_pass(bits, keep)


def _bank_ordered_pass(bits: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tiles, device = keep.shape[0], keep.device
    locations, slots = _bank_major(device)
    keep_bm = keep[:, locations].view(tiles, BANKS, PER_BANK)
    per_bank = keep_bm.sum(2, dtype=torch.int32)  # (tiles, banks)
    rank = keep_bm.cumsum(2, dtype=torch.int32)  # 1-based rank of each kept word in its bank
    # Round r holds the rank-r word of every bank with more than r words, in bank order.
    active = per_bank[:, :, None] > torch.arange(PER_BANK, dtype=torch.int32, device=device)
    before = active.cumsum(1, dtype=torch.int32)  # banks up to and including this one still active
    per_round = before[:, -1, :]
    round_start = per_round.cumsum(1, dtype=torch.int32) - per_round
    # The kept words, bank by bank; flat indices into the tiles (1-D gathers are the fast ones).
    flat = torch.nonzero(keep_bm.view(-1)).squeeze(1)
    if tiles * TILE_ELEMS < 2**31:  # half the bytes of every pass below
        flat = flat.to(torch.int32)
    tile, within = flat // TILE_ELEMS, flat % TILE_ELEMS
    bank = within // PER_BANK
    r = rank.view(-1).index_select(0, flat).to(flat.dtype) - 1
    seq = (round_start.view(-1).index_select(0, tile * PER_BANK + r)
           + before.view(-1).index_select(0, (tile * BANKS + bank) * PER_BANK + r) - 1)  # in round-robin order
    counts = per_bank.sum(1, dtype=torch.int64)
    full = (counts // GROUP * GROUP).to(flat.dtype).index_select(0, tile)
    rnd, lane = seq // ROUND, seq % ROUND
    place = torch.where(seq < full, WORD_ALIGN * (ROUND * (rnd // WORD_ALIGN) + lane) + rnd % WORD_ALIGN, seq)
    place += (torch.cumsum(counts, 0) - counts).to(flat.dtype).index_select(0, tile)
    value_bits = bits.reshape(-1).index_select(0, tile * TILE_ELEMS + locations.index_select(0, within))
    kept = _words(value_bits, slots.index_select(0, within))
    nonzero_words = torch.empty_like(kept)
    nonzero_words[place] = kept
    sentinel = SENTINEL_SLOT << (8 * bits.element_size())  # value bits 0 in the low half
    return pack_aligned(counts, nonzero_words, WORD_ALIGN, sentinel)


def split_words(words: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Words -> (values in `dtype`, int64 slots)."""
    half, _ = _HALF_TYPES[dtype]
    pair = words.view(half).reshape(-1, 2)
    return pair[:, 0].contiguous().view(dtype), pair[:, 1].to(torch.int64)


class TiledCSLWeight(SparseWeight):
    name = "tiled_csl"
    format_code = 1
    version = 2
    upgradable_versions = (1,)
    tensor_names = ("words", "offsets")

    words: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "TiledCSLWeight":
        weight = check_dense_weight(weight)
        tm, tk = _grid(weight.shape)
        tiles = to_storage_order(pad_2d(weight, tm * TILE_M, tk * TILE_K))
        words, offsets = bank_ordered_words(tiles.view(_HALF_TYPES[weight.dtype][0]), tiles != 0)
        return cls(tuple(weight.shape), weight.dtype, words=words, offsets=offsets)

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

    def to_dense(self) -> torch.Tensor:
        values, slots = split_words(self.words, self.dtype)
        tile_of_word = torch.arange(self.offsets.numel() - 1, device=self.words.device)
        # output_size: the total is known, so no device-to-host sync (CUDA graphs can capture this)
        tile_of_word = tile_of_word.repeat_interleave(self.offsets.diff().to(torch.int64),
                                                      output_size=self.words.numel())
        # One spare slot per tile takes the sentinel words, as the kernel's shared memory does.
        tiles = torch.zeros(
            (self.offsets.numel() - 1) * (TILE_ELEMS + 1), dtype=self.dtype, device=self.words.device
        )
        tiles[tile_of_word * (TILE_ELEMS + 1) + location_of(slots)] = values
        dense = from_storage_order(tiles.view(-1, TILE_ELEMS + 1)[:, :TILE_ELEMS], _grid(self.shape))
        return dense[: self.shape[0], : self.shape[1]]

    @property
    def nnz(self) -> int:
        _, slots = split_words(self.words, self.dtype)
        return int((slots != SENTINEL_SLOT).sum())

    def _cast_values(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        values, slots = split_words(self.words, self.dtype)
        return {"words": make_words(cast_finite(values, dtype, self.name), slots), "offsets": self.offsets}

    def _validate(self) -> None:
        tm, tk = _grid(self.shape)
        words = expect_tensor(self, "words", _HALF_TYPES[self.dtype][1])
        offsets = expect_tensor(self, "offsets", torch.int32, tm * tk + 1)
        if words.device != offsets.device:
            raise FormatError("tiled_csl tensors are on different devices")
        steps = check_offsets(self, offsets, words.numel(), WORD_ALIGN)
        values, slots = split_words(words, self.dtype)
        if bool(((slots < 0) | (slots > SENTINEL_SLOT) | (slots % 2 != 0)).any()):
            raise FormatError(f"tiled_csl slots fall outside the {TILE_M}x{TILE_K} tile (corrupted data)")
        real = slots != SENTINEL_SLOT
        tile_of_word = torch.arange(tm * tk, device=words.device).repeat_interleave(steps, output_size=words.numel())
        # Within a tile: the non-zeros in any order, each slot once, then only sentinels, fewer
        # than one vector of them.
        first_word = offsets.to(torch.int64)
        real_before = F.pad(real.cumsum(0), (1, 0))
        real_per_tile = real_before[first_word[1:]] - real_before[first_word[:-1]]
        if bool((real_per_tile > TILE_ELEMS).any()) or _repeated_slots(first_word, tile_of_word, slots, real):
            raise FormatError("tiled_csl slots are repeated within a tile (corrupted data)")
        sentinels_before = F.pad((~real).cumsum(0), (1, 0))
        after_sentinel = sentinels_before[:-1] - sentinels_before[first_word[:-1]][tile_of_word] > 0
        if (bool((real & after_sentinel).any()) or bool((steps - real_per_tile >= WORD_ALIGN).any())
                or bool(((values != 0) & ~real).any())):
            raise FormatError("tiled_csl padding is malformed (corrupted data)")
        if not bool(torch.isfinite(values).all()):
            raise FormatError("tiled_csl values hold inf or NaN (corrupted data)")
        if tm * TILE_M != self.shape[0] or tk * TILE_K != self.shape[1]:  # else there is no padding
            locations = location_of(slots)
            rows = tile_of_word // tk * TILE_M + locations // TILE_K
            cols = tile_of_word % tk * TILE_K + locations % TILE_K
            if bool((real & ((rows >= self.shape[0]) | (cols >= self.shape[1]))).any()):
                raise FormatError("tiled_csl stores non-zeros in the padding (corrupted data)")



def _repeated_slots(first_word: torch.Tensor, tile_of_word: torch.Tensor, slots: torch.Tensor,
                    real: torch.Tensor, tiles_per_pass: int = 1024) -> bool:
    """Whether a tile holds a slot twice; counted a bounded number of tiles at a time (a count per
    slot of the whole weight would take 8 bytes per weight element)."""
    tiles = first_word.numel() - 1
    for t0 in range(0, tiles, tiles_per_pass):
        lo, hi = int(first_word[t0]), int(first_word[min(t0 + tiles_per_pass, tiles)])
        keep = real[lo:hi]
        key = (tile_of_word[lo:hi][keep] - t0) * TILE_ELEMS + (slots[lo:hi][keep] >> 1)
        if key.numel() and int(torch.bincount(key).max()) > 1:
            return True
    return False
