"""Bitmap format: one bit per element says where the non-zeros are; only the non-zeros are stored.

Bytes per weight element, dense fp16 being 2: ``1/8 + (1 - s) * 2`` at sparsity ``s``, i.e. 1.125
at 50% (56% of dense), 0.725 at 70%, 0.325 at 90%. It beats dense from about 6% sparsity and beats
Tiled-CSL at every sparsity below about 94%, because a location costs 1 bit here and 16 bits there.

Layout version 1 (everything a kernel must know lives in this block):

* The weight (M x K) is zero-padded to multiples of a 64 x 64 *group tile*. Group tiles are stored
  row-major over the grid, so the tiles of one 64-row strip follow each other along K: a thread
  block that owns a strip reads one contiguous run of memory.
* Inside a group tile the 16 x 16 tensor-core tiles go row-major, and inside each of those the four
  8 x 8 *blocks* go in the order of the A-operand registers of ``mma.m16n8k16`` (rows 0-7/cols 0-7,
  rows 8-15/cols 0-7, rows 0-7/cols 8-15, rows 8-15/cols 8-15). A block's elements are row-major.
* ``masks``: 8 bytes per block, i.e. one little-endian 64-bit word whose bit ``8*r + c`` is set when
  element (r, c) of the block is non-zero. In an mma fragment lane ``l`` holds elements ``2l`` and
  ``2l+1`` of each block, so its values start at ``popcount(mask & ((1 << 2l) - 1))``.
* ``values``: the non-zeros of each group tile in the order above, each tile's run zero-padded to a
  multiple of 8 values (16 bytes in fp16) so every tile starts on an aligned vector load.
* ``offsets``: int32, one per group tile plus one, the start of each tile's run in ``values``.

``nbytes = M_pad * K_pad / 8 + elem * sum_t ceil8(nnz_t) + 4 * (tiles + 1) + 40`` with
``M_pad, K_pad`` rounded up to 64, ``nnz_t`` the non-zeros of group tile ``t``, ``ceil8`` rounding
up to a multiple of 8, and 40 bytes of header.
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

GROUP_M = 64
GROUP_K = 64
MMA = 16
BLOCK = 8
VALUE_ALIGN = 8
TILE_ELEMS = GROUP_M * GROUP_K
MASK_BYTES_PER_TILE = TILE_ELEMS // 8
# Elements `to_dense` decodes per step: its sources take 4 bytes each (8 past 2^31 values). Small
# on the CPU, where they then stay in cache; large on a GPU, where every step is a few launches.
CPU_DECODE_CHUNK = 1 << 20
DECODE_CHUNK = 1 << 26
# Weights with fewer values than this decode with int32 sources (index 0 is the zero put in front).
INT32_SOURCES = 2**31 - 1

# (strip, m-tile, block-row, row, k-tile, mma-col, block-col, col) -> storage order
# (strip, k-tile, mma-row, mma-col, block-col, block-row, row, col) and back.
_TO_STORAGE = (0, 4, 1, 5, 6, 2, 3, 7)
_FROM_STORAGE = (0, 2, 5, 6, 1, 3, 4, 7)
# A mask byte is one 8-element row of a block. Its axes (strip, k-tile, mma-row, mma-col, block-col,
# block-row, row) -> the dense weight's bytes (strip, mma-row, block-row, row, k-tile, mma-col, block-col).
_BYTES_FROM_STORAGE = (0, 2, 5, 6, 1, 3, 4)
_BIT_WEIGHTS = {}
_BYTE_TABLES = {}


def _grid(shape: tuple[int, int]) -> tuple[int, int]:
    return ceil_to(shape[0], GROUP_M) // GROUP_M, ceil_to(shape[1], GROUP_K) // GROUP_K


def _bit_weights(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=device)
    return _BIT_WEIGHTS[key]


def _byte_tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask byte value: (256, 8), bit b's rank among the set bits plus one, or the most negative
    `dtype` number when bit b is clear (so adding any source offset leaves it negative); and
    (256, 1), the number of set bits."""
    key = (str(device), dtype)
    if key not in _BYTE_TABLES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        rank = torch.where(bits.bool(), bits.cumsum(1) - bits + 1, torch.iinfo(dtype).min)
        _BYTE_TABLES[key] = (rank.to(device, dtype), bits.sum(1, keepdim=True).to(device, dtype))
    return _BYTE_TABLES[key]


def to_storage_order(padded: torch.Tensor) -> torch.Tensor:
    """(M_pad, K_pad) -> (tiles, 4096) with each row a group tile in storage order."""
    tm, tk = padded.shape[0] // GROUP_M, padded.shape[1] // GROUP_K
    m = GROUP_M // MMA
    k = GROUP_K // MMA
    view = padded.reshape(tm, m, 2, BLOCK, tk, k, 2, BLOCK)
    return view.permute(_TO_STORAGE).reshape(tm * tk, TILE_ELEMS)


def from_storage_order(tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    tm, tk = grid
    view = tiles.reshape(tm, tk, GROUP_M // MMA, GROUP_K // MMA, 2, 2, BLOCK, BLOCK)
    return view.permute(_FROM_STORAGE).reshape(tm * GROUP_M, tk * GROUP_K)


def _bytes_in_dense_order(per_byte: torch.Tensor, tm: int, tk: int) -> torch.Tensor:
    view = per_byte.view(tm, tk, GROUP_M // MMA, GROUP_K // MMA, 2, 2, BLOCK)
    return view.permute(_BYTES_FROM_STORAGE).reshape(-1)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """Bool (..., 8n) -> uint8 (n...): bit b of byte i is element 8i + b (little-endian words)."""
    bits = keep.reshape(-1, 8).to(torch.uint8) * _bit_weights(keep.device)
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_bits(masks: torch.Tensor) -> torch.Tensor:
    return (masks.reshape(-1, 1) & _bit_weights(masks.device)).ne(0).reshape(-1)


class BitmapWeight(SparseWeight):
    name = "bitmap"
    format_code = 2
    version = 1
    tensor_names = ("masks", "values", "offsets")

    masks: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "BitmapWeight":
        weight = check_dense_weight(weight)
        tm, tk = _grid(weight.shape)
        tiles = to_storage_order(pad_2d(weight, tm * GROUP_M, tk * GROUP_K))
        keep = tiles != 0
        values, offsets = pack_aligned(keep.sum(dim=1), tiles[keep], VALUE_ALIGN, 0)
        return cls(tuple(weight.shape), weight.dtype, masks=pack_bits(keep), values=values, offsets=offsets)

    def keep_mask(self) -> torch.Tensor:
        """Bool (tiles, 4096): the decoded bitmap in storage order."""
        return unpack_bits(self.masks).reshape(-1, TILE_ELEMS)

    def to_dense(self) -> torch.Tensor:
        # Each element's source is the first value of its mask byte plus its rank in the byte: the
        # popcount arithmetic a kernel lane does. Ranks are computed in the dense weight's order, so
        # one gather writes the result without a pass to reorder it; clear bits land on index 0,
        # a zero put in front of the values. Indices are int32 whenever the values allow: half the
        # bytes of every pass. (F.embedding and index_select are the fastest lookups on a CPU.)
        tm, tk = _grid(self.shape)
        index = torch.int32 if self.values.numel() < INT32_SOURCES else torch.int64
        rank, popcount = _byte_tables(self.masks.device, index)
        masks = self.masks.to(torch.int32)
        per_byte = F.embedding(masks, popcount).view(tm * tk, MASK_BYTES_PER_TILE)
        first = per_byte.cumsum(dim=1, dtype=index)
        first -= per_byte
        first += self.offsets[:-1, None]
        masks = _bytes_in_dense_order(masks, tm, tk)
        first = _bytes_in_dense_order(first, tm, tk)
        values = torch.cat([self.values.new_zeros(1), self.values])
        dense = torch.empty(tm * GROUP_M * tk * GROUP_K, dtype=self.dtype, device=values.device)
        chunk = CPU_DECODE_CHUNK if values.device.type == "cpu" else DECODE_CHUNK
        step = max(1, chunk // (GROUP_M * tk * GROUP_K)) * GROUP_M * tk * GROUP_K // 8  # whole strips
        for start in range(0, masks.numel(), step):
            source = F.embedding(masks[start : start + step], rank)
            source += first[start : start + step, None]
            source.clamp_(min=0)
            torch.index_select(values, 0, source.view(-1), out=dense[start * 8 : (start + step) * 8])
        return dense.view(tm * GROUP_M, tk * GROUP_K)[: self.shape[0], : self.shape[1]]

    @property
    def nnz(self) -> int:
        return int(self.keep_mask().sum())

    def _cast_values(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        # The alignment is counted in values, not bytes, so a cast never needs a repack.
        return {**self.tensors(), "values": cast_finite(self.values, dtype, self.name)}

    def _validate(self) -> None:
        tm, tk = _grid(self.shape)
        tiles = tm * tk
        masks = expect_tensor(self, "masks", torch.uint8, tiles * MASK_BYTES_PER_TILE)
        values = expect_tensor(self, "values", self.dtype)
        offsets = expect_tensor(self, "offsets", torch.int32, tiles + 1)
        if not (masks.device == values.device == offsets.device):
            raise FormatError("bitmap tensors are on different devices")
        steps = check_offsets(self, offsets, values.numel(), VALUE_ALIGN)
        counts = self.keep_mask().sum(dim=1)
        if bool((steps != (counts + VALUE_ALIGN - 1) // VALUE_ALIGN * VALUE_ALIGN).any()):
            raise FormatError(
                "bitmap masks and offsets disagree on how many values a tile holds (corrupted data)"
            )
        pad_m = tm * GROUP_M - self.shape[0]
        pad_k = tk * GROUP_K - self.shape[1]
        if pad_m or pad_k:
            outside = from_storage_order(self.keep_mask(), (tm, tk))
            if bool(outside[self.shape[0] :].any()) or bool(outside[:, self.shape[1] :].any()):
                raise FormatError("bitmap masks mark non-zeros in the padding (corrupted data)")
        if not bool(torch.isfinite(values).all()):
            raise FormatError("bitmap values hold inf or NaN (corrupted data)")
