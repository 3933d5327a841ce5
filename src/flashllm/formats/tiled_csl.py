"""Tiled-CSL, Flash-LLM's format: each non-zero stored with its location inside its tile.

Bytes per weight element, dense fp16 being 2: ``(1 - s) * 4`` at sparsity ``s``, i.e. 2.0 at 50%
(no saving), 1.2 at 70%, 0.4 at 90%. It pays only from 50% sparsity; it is the format the original
Flash-LLM kernel reads, and the smaller one above about 94% sparsity.

Unlike the published kernel, which sizes its shared-memory buffer for half a tile and so silently
drops values in tiles denser than 50%, every tile density from 0 to 100% is stored and decoded.

Layout version 1 (everything a kernel must know lives in this block):

* The weight (M x K) is zero-padded to multiples of a 128 x 64 tile; tiles are stored row-major
  over the grid, so the tiles of one 128-row strip follow each other along K.
* ``words``: per tile, its non-zeros in row-major order of their location ``r * 64 + c``. For fp16
  and bf16 a word is an int32 holding the value's 16 bits in the low half and the location in the
  high half, so one 128-bit load brings four complete non-zeros; for fp32 it is an int64 built the
  same way from 32-bit halves. Each tile's run is padded to a multiple of 4 words with *sentinel*
  words (value 0, location 8192 = one past the tile), which a kernel scatters into a spare
  shared-memory slot instead of branching.
* ``offsets``: int32, one per tile plus one, the start of each tile's run in ``words``.

``nbytes = word * sum_t ceil4(nnz_t) + 4 * (tiles + 1) + 40`` with ``word`` 4 bytes (8 for fp32),
``nnz_t`` the non-zeros of tile ``t``, ``ceil4`` rounding up to a multiple of 4, and 40 bytes of header.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import (
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
SENTINEL = TILE_ELEMS
WORD_ALIGN = 4

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
    half, word = _HALF_TYPES[values.dtype]
    pair = torch.stack([values.view(half), locations.to(half)], dim=1)
    return pair.view(word).reshape(-1)


def split_words(words: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Words -> (values in `dtype`, int64 locations)."""
    half, _ = _HALF_TYPES[dtype]
    pair = words.view(half).reshape(-1, 2)
    return pair[:, 0].contiguous().view(dtype), pair[:, 1].to(torch.int64)


class TiledCSLWeight(SparseWeight):
    name = "tiled_csl"
    format_code = 1
    version = 1
    tensor_names = ("words", "offsets")

    words: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "TiledCSLWeight":
        weight = check_dense_weight(weight)
        tm, tk = _grid(weight.shape)
        tiles = to_storage_order(pad_2d(weight, tm * TILE_M, tk * TILE_K))
        keep = tiles != 0
        locations = torch.arange(TILE_ELEMS, device=weight.device).expand_as(keep)[keep]
        nonzero_words = make_words(tiles[keep], locations)
        sentinel = int(make_words(weight.new_zeros(1), torch.tensor([SENTINEL], device=weight.device)))
        words, offsets = pack_aligned(keep.sum(dim=1), nonzero_words, WORD_ALIGN, sentinel)
        return cls(tuple(weight.shape), weight.dtype, words=words, offsets=offsets)

    def to_dense(self) -> torch.Tensor:
        values, locations = split_words(self.words, self.dtype)
        tile_of_word = torch.arange(self.offsets.numel() - 1, device=self.words.device)
        # output_size: the total is known, so no device-to-host sync (CUDA graphs can capture this)
        tile_of_word = tile_of_word.repeat_interleave(self.offsets.diff().to(torch.int64),
                                                      output_size=self.words.numel())
        # One spare slot per tile takes the sentinel words, as the kernel's shared memory does.
        tiles = torch.zeros(
            (self.offsets.numel() - 1) * (TILE_ELEMS + 1), dtype=self.dtype, device=self.words.device
        )
        tiles[tile_of_word * (TILE_ELEMS + 1) + locations] = values
        dense = from_storage_order(tiles.view(-1, TILE_ELEMS + 1)[:, :TILE_ELEMS], _grid(self.shape))
        return dense[: self.shape[0], : self.shape[1]]

    @property
    def nnz(self) -> int:
        _, locations = split_words(self.words, self.dtype)
        return int((locations != SENTINEL).sum())

    def _cast_values(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        values, locations = split_words(self.words, self.dtype)
        return {"words": make_words(cast_finite(values, dtype, self.name), locations), "offsets": self.offsets}

    def _validate(self) -> None:
        tm, tk = _grid(self.shape)
        words = expect_tensor(self, "words", _HALF_TYPES[self.dtype][1])
        offsets = expect_tensor(self, "offsets", torch.int32, tm * tk + 1)
        if words.device != offsets.device:
            raise FormatError("tiled_csl tensors are on different devices")
        steps = check_offsets(self, offsets, words.numel(), WORD_ALIGN)
        values, locations = split_words(words, self.dtype)
        if bool(((locations < 0) | (locations > SENTINEL)).any()):
            raise FormatError(f"tiled_csl locations fall outside the {TILE_M}x{TILE_K} tile (corrupted data)")
        real = locations != SENTINEL
        # Within a tile: non-zeros strictly increasing, then only sentinels, fewer than one vector.
        # A pair of neighbouring words is checked unless the second one starts a tile.
        first_word = offsets.to(torch.int64)
        starts = torch.zeros(words.numel() + 1, dtype=torch.bool, device=words.device)
        starts[first_word] = True
        step = locations.diff()
        if bool((~starts[1:-1] & ((step < 0) | ((step == 0) & real[1:]))).any()):
            raise FormatError("tiled_csl locations are repeated or out of order within a tile (corrupted data)")
        real_before = F.pad(real.cumsum(0), (1, 0))
        real_per_tile = real_before[first_word[1:]] - real_before[first_word[:-1]]
        if bool((steps - real_per_tile >= WORD_ALIGN).any()) or bool(((values != 0) & ~real).any()):
            raise FormatError("tiled_csl padding is malformed (corrupted data)")
        if not bool(torch.isfinite(values).all()):
            raise FormatError("tiled_csl values hold inf or NaN (corrupted data)")
        if tm * TILE_M != self.shape[0] or tk * TILE_K != self.shape[1]:  # else there is no padding
            tile_of_word = torch.arange(tm * tk, device=words.device).repeat_interleave(
                steps, output_size=words.numel())
            rows = tile_of_word // tk * TILE_M + locations // TILE_K
            cols = tile_of_word % tk * TILE_K + locations % TILE_K
            if bool((real & ((rows >= self.shape[0]) | (cols >= self.shape[1]))).any()):
                raise FormatError("tiled_csl stores non-zeros in the padding (corrupted data)")
