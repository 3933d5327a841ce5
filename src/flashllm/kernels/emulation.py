"""Pure-PyTorch emulation of the CUDA kernels, lane by lane, register by register.

The CUDA kernels cannot run in CI (no GPU), but every decision that could make them silently wrong
is index arithmetic: which bits a lane reads, where its values come from in shared memory, which
bytes a PRMT selects, which rows ldmatrix returns to which lane, where an accumulator lands in y.
This module repeats that arithmetic exactly as ``cuda/*.cu`` write it, on CPU tensors, so the tests
can compare the result with `to_dense` bit for bit and with a float64 product:

* `bitmap_b_fragments`: the per-warp table (popcounts, 32-lane scan, row base), each lane's rank,
  the two 16-bit loads from the stage buffer *including the stale bytes that follow the run*, and
  the PRMT selection, giving every B-fragment register of every tile.
* `bitmap_scatter_b_fragments`: the same registers from the scatter decode: each lane's walk over
  its mask word's bits, two per trip, into the warp's zeroed rows, then the ldmatrix.x4 reads.
* `tiled_csl_b_fragments`: the scatter of every word, sentinels and the CAPW piece reloads
  included, into the swizzled shared tile, and the ldmatrix.x4 reads of each warp.
* `a_fragments`: the staged activations (zero fill past N and the valid columns) and the
  ldmatrix addressing of `load_a_frags`, including the N <= 8 path (both kernels; not Tiled-CSL
  with 8 warps and one dense tile) whose one x4 serves two k16 steps, each accumulating into its own
  rows (`_run_blocks` folds them as `fold_steps` does).
* `bitmap_expanded`: `cuda/bitmap_expand.cu`, the prefill path's expansion to a dense weight:
  each block's tiles' runs copied into one shared stage, each thread's two mask bytes per tile,
  the block-wide scans of their popcounts, the (row, column) each byte's row piece lands on, and
  the stores that stop at M and K; `tiled_csl_expanded` the same
  for `cuda/tiled_csl_expand.cu`: the scatter into the zeroed shared tile, the rows written out.
* `tiled_csl_cores_kernel`: the Tiled-CSL kernel's CUDA-core path for one activation row: the 8
  swizzled copies of the staged row (`row_copies`), and per word the row its product adds into
  and the activation its slot addresses (`tiled_csl_core_terms`).
* `tiled_csl_wgmma_kernel`, `bitmap_wgmma_kernel`: both kernels through Hopper's warpgroup MMA
  (FLASHLLM_WGMMA): the shared-memory operands as the tensor cores address them through their
  descriptors in the 128-byte swizzle (`sw128_addresses`; Tiled-CSL's dense tiles, and the
  activations staged in that swizzle, `stage_x_sw128`), the bitmap decode's registers as the A
  operand (`bitmap_wgmma_a`), the documented accumulator layout (`wgmma_d_layout`) and the
  epilogue's shuffle into pairs along M (`store_half_targets`).
* `tiled_csl16_b_fragments`, `tiled_csl16_kernel`, `tiled_csl16_expanded`: the tiled_csl16 kernel
  (`cuda/tiled_csl16_spmm.cu`): each warp's scatter of a 16 x 64 tile into its fragment-ordered
  shared tile (the staged words and the over-full rest read from global memory), the four 16-byte
  loads per lane that are its B registers, the activation chunks of 128 / NROWS tiles; and its
  expansion kernel's gather of 4 pairs per output chunk.
* `mma_m16n8k16`: the tensor-core instruction at register level, with the fragment layouts the PTX
  ISA documents; `bitmap_kernel` / `tiled_csl_kernel` chain everything with the kernels' split-K
  partition, blocks along N and the epilogue's (n, m) mapping.

A register here is an int64 tensor holding the 32-bit pattern (low half = lower k index).
When the .cu files change, this file must change with them: it is their executable specification.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..formats.bitmap import GROUP_K, GROUP_M, BitmapWeight
from ..formats import tiled_csl16 as csl16
from ..formats.tiled_csl import TILE_ELEMS, TILE_K, TILE_M, TiledCSLWeight
from ..formats.tiled_csl16 import TiledCSL16Weight
from .configs import persistent_ranges

LANES = 32
WARPS = 4
XS_STRIDE = 72  # halves per staged activation row (common.cuh)
BITMAP_VALUE_SLOTS = 4096 + 8  # halves in a bitmap stage's value buffer (bitmap_spmm.cu: VALCAP + 8)
CSL_DENSE_SLOTS = TILE_ELEMS + 8  # halves in a Tiled-CSL dense tile buffer (tiled_csl_spmm.cu)
SEL_LO, SEL_HI = 0x22102222, 0x54101022  # bitmap_spmm.cu
SEL_TABLE = SEL_HI << 32 | SEL_LO
_LANE = torch.arange(LANES)
_G, _T = _LANE >> 2, _LANE & 3  # mma groupID and thread-in-group

_POPC8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------------
def popc(v: torch.Tensor) -> torch.Tensor:
    """__popc of 32-bit patterns held in int64."""
    v = v & 0xFFFFFFFF
    return sum(_POPC8[(v >> s) & 0xFF] for s in (0, 8, 16, 24))


def rotate_right(v: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """``__funnelshift_r(v, v, n)`` (shf.r.wrap) of 32-bit patterns: v rotated right by n % 32."""
    v = v & 0xFFFFFFFF
    n = torch.as_tensor(n, dtype=torch.int64) & 31
    return ((v >> n) | (v << ((32 - n) & 31))) & 0xFFFFFFFF


def prmt(a: torch.Tensor | int, b: torch.Tensor | int, c: torch.Tensor | int) -> torch.Tensor:
    """PTX ``prmt.b32`` in its default mode (selector nibble: byte index, bit 3 = sign replicate)."""
    a, b, c = (torch.as_tensor(v, dtype=torch.int64) for v in (a, b, c))
    src = (b << 32) | (a & 0xFFFFFFFF)
    out = torch.zeros(torch.broadcast_shapes(a.shape, b.shape, c.shape), dtype=torch.int64)
    for i in range(4):
        nib = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        byte = torch.where((nib & 8) != 0, torch.where((byte & 0x80) != 0, 0xFF, 0), byte)
        out |= byte << (8 * i)
    return out


def halves_to_float(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """16-bit patterns (int64 in 0..65535) -> float64 values of `dtype`."""
    return bits.to(torch.int32).to(torch.int16).view(dtype).to(torch.float64)


def float_bits(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 tensor -> its 16-bit patterns as int64 in 0..65535."""
    return t.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def ldmatrix(buf: torch.Tensor, row_addr: torch.Tensor) -> torch.Tensor:
    """``ldmatrix.m8n8.b16`` with as many matrices as `row_addr` has groups of 8 lanes.

    buf: (..., slots) 16-bit patterns of a shared-memory buffer; row_addr: (..., 8 * matrices) half
    index of each row, lane 8q + r addressing row r of matrix q. Returns (..., 32, matrices)
    registers: lane l gets row l / 4, halves 2 (l % 4) and 2 (l % 4) + 1 of each matrix."""
    mats = row_addr.shape[-1] // 8
    q = torch.arange(mats)
    src_lane = 8 * q[None, :] + _G[:, None]  # (32, mats)
    start = row_addr[..., src_lane] + 2 * _T[:, None]  # (..., 32, mats)
    flat = start.reshape(*start.shape[:-2], -1)
    lo = torch.gather(buf, -1, flat)
    hi = torch.gather(buf, -1, flat + 1)
    return (lo | (hi << 16)).reshape(start.shape)


# Fragment layouts of mma.m16n8k16 for 16-bit inputs (PTX ISA, "Matrix Fragments for mma.m16n8k16"):
# A (16 x 16): a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..)
# B (16 x 8):  b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t + 8.., n = g)
# C (16 x 8):  c0 = (g, 2t), c1 = (g, 2t + 1), c2 = (g + 8, 2t), c3 = (g + 8, 2t + 1)
_A_ROW = torch.stack([_G, _G + 8, _G, _G + 8], 1)  # (32, 4)
_A_COL = torch.stack([2 * _T, 2 * _T, 2 * _T + 8, 2 * _T + 8], 1)
_B_K = torch.stack([2 * _T, 2 * _T + 8], 1)  # (32, 2)
_C_ROW = torch.stack([_G, _G, _G + 8, _G + 8], 1)
_C_COL = torch.stack([2 * _T, 2 * _T + 1, 2 * _T, 2 * _T + 1], 1)


def a_matrix(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., 32, 4) A registers -> (..., 16, 16) float64 matrix."""
    out = torch.zeros(*a.shape[:-2], 16, 16, dtype=torch.float64)
    lo, hi = halves_to_float(a & 0xFFFF, dtype), halves_to_float((a >> 16) & 0xFFFF, dtype)
    out[..., _A_ROW, _A_COL] = lo
    out[..., _A_ROW, _A_COL + 1] = hi
    return out


def b_matrix(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., 32, 2) B registers -> (..., 16, 8) float64 matrix."""
    out = torch.zeros(*b.shape[:-2], 16, 8, dtype=torch.float64)
    lo, hi = halves_to_float(b & 0xFFFF, dtype), halves_to_float((b >> 16) & 0xFFFF, dtype)
    g = _G[:, None].expand(LANES, 2)
    out[..., _B_K, g] = lo
    out[..., _B_K + 1, g] = hi
    return out


def c_registers(c: torch.Tensor) -> torch.Tensor:
    """(..., 16, 8) accumulator matrix -> (..., 32, 4) per-lane registers."""
    return c[..., _C_ROW, _C_COL]


def mma_m16n8k16(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """D = A B for register fragments (float64 result; the hardware accumulates in fp32)."""
    return c_registers(a_matrix(a, dtype) @ b_matrix(b, dtype))


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------
def stage_x(x: torch.Tensor, nrows: int, n0: int, k0: int, kx: int, stale: int = 0x7E00) -> torch.Tensor:
    """The staged activation tile of `stage_x` (common.cuh): (nrows, XS_STRIDE) 16-bit patterns,
    zero past N and past the kx valid columns, the 8 pad halves of each row left stale."""
    n = x.shape[0]
    xs = torch.full((nrows, XS_STRIDE), stale, dtype=torch.int64)
    xs[:, :64] = 0
    rows = min(nrows, n - n0)
    cols = min(64, kx - k0)
    if rows > 0 and cols > 0:
        xs[:rows, :cols] = float_bits(x[n0 : n0 + rows, k0 : k0 + cols])
    return xs


def a_fragments(xs: torch.Tensor, nrows: int, steps: int = 1) -> torch.Tensor:
    """`load_a_frags<steps>` for the 4 k16 steps: (4, NT, 32, 4) registers from a staged tile."""
    nt = max(1, nrows // 16)
    lane = _LANE
    out = torch.zeros(4, nt, LANES, 4, dtype=torch.int64)
    flat = xs.reshape(-1)
    for kc in range(4):
        if nrows == 8 and steps == 2:
            # One x4 per pair of steps (kc even), used by both: the 8 rows as {k 0-7, k 16-23,
            # k 8-15, k 24-31} of the pair's 32 columns; step kc uses (a0, a2), step kc + 1 (a1, a3).
            q = lane >> 3
            k = (kc & ~1) * 16 + (q & 1) * 16 + (q >> 1) * 8
            out[kc, 0] = ldmatrix(flat, (lane & 7) * XS_STRIDE + k)
        elif nrows == 8:
            # x2: lanes 0-7 rows 0-7 / k 0-7 (a0), lanes 8-15 rows 0-7 / k 8-15 (a2); a1 = a3 = 0.
            r = lane & 7
            k = kc * 16 + ((lane >> 3) & 1) * 8
            regs = ldmatrix(flat, (r * XS_STRIDE + k)[:16])
            out[kc, 0, :, 0] = regs[:, 0]
            out[kc, 0, :, 2] = regs[:, 1]
        else:
            q = lane >> 3
            r = (q & 1) * 8 + (lane & 7)
            k = kc * 16 + (q >> 1) * 8
            for t in range(nt):
                out[kc, t] = ldmatrix(flat, (t * 16 + r) * XS_STRIDE + k)
    return out


def padded_activations(x2d: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int]:
    """What `launch.prepare_activations` hands the kernel: columns up to a multiple of 8, zeros
    past `in_features`; returns (activations, kx)."""
    k8 = -(-in_features // 8) * 8
    if k8 == in_features:
        return x2d, k8
    padded = x2d.new_zeros((x2d.shape[0], k8))
    padded[:, :in_features] = x2d
    return padded, k8


# ---------------------------------------------------------------------------------------------
# Bitmap
# ---------------------------------------------------------------------------------------------
def _bitmap_stage_values(w: BitmapWeight, stale: Optional[int], value_cap: int = 4096) -> torch.Tensor:
    """(tiles, value_cap + 8) stage buffers: each tile's run, then stale bytes (`stale`, or a
    random pattern per slot when None) standing for whatever an earlier stage left there. A run
    longer than the buffer raises, as the kernel traps (a fitted buffer, configs.FIT); a read past
    it fails the emulation's gather."""
    tiles = w.offsets.numel() - 1
    slots = value_cap + 8
    if stale is None:
        buf = torch.randint(0, 1 << 16, (tiles, slots), dtype=torch.int64)
    else:
        buf = torch.full((tiles, slots), stale, dtype=torch.int64)
    off = w.offsets.to(torch.int64)
    lengths = off.diff()
    if lengths.numel() and int(lengths.max()) > value_cap:
        raise RuntimeError(f"a tile run of {int(lengths.max())} values does not fit a {value_cap}-value buffer "
                           "(the kernel traps)")
    vals = float_bits(w.values)
    if vals.numel():
        tile_of = torch.repeat_interleave(torch.arange(tiles), lengths)
        pos = torch.arange(vals.numel()) - torch.repeat_interleave(off[:-1], lengths)
        buf[tile_of, pos] = vals
    return buf


def bitmap_table(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-warp {word, base} table of every tile: words (tiles, 128) -> (tiles, 4, 32) each.

    Lane j of warp w holds word 32w + j (block 16w + j / 2, half j % 2); base = popcount of the rows
    above (__reduce_add_sync) + exclusive scan of the row's word popcounts (__shfl_up_sync)."""
    count = popc(words).reshape(-1, WARPS, LANES)
    row_total = count.sum(-1)
    row_base = torch.cumsum(row_total, 1) - row_total
    inclusive = torch.cumsum(count, -1)
    return words.reshape(-1, WARPS, LANES), row_base[..., None] + inclusive - count


def table_slot(half, block):
    """`table_slot` (bitmap_spmm.cu): where the entry of (half, block) sits in a warp's table."""
    return 16 * half + block


def bitmap_b_fragments(w: BitmapWeight, stale: Optional[int] = 0x7E00, value_cap: int = 4096) -> torch.Tensor:
    """Every B-fragment register the bitmap kernel's lanes build: (tiles, warp, kc, jj, bc, 32).

    Register (w, kc, jj, bc) of lane l holds W[16w + 8jj + l / 4][16kc + 8bc + 2 (l % 4) + {0, 1}]
    of its group tile (low half first), decoded the kernel's way."""
    masks = w.masks.to(torch.int64).reshape(-1, 128, 4)
    words = masks[..., 0] | (masks[..., 1] << 8) | (masks[..., 2] << 16) | (masks[..., 3] << 24)
    entry_word, entry_base = bitmap_table(words)
    # Stored half-major: scan lane j (block j / 2, half j % 2) at slot 16 (j % 2) + j / 2.
    slot = table_slot(_LANE & 1, _LANE >> 1)
    stored_word, stored_base = torch.empty_like(entry_word), torch.empty_like(entry_base)
    stored_word[..., slot], stored_base[..., slot] = entry_word, entry_base
    buf = _bitmap_stage_values(w, stale, value_cap)
    tiles = words.shape[0]
    half = _LANE >> 4
    sh = (2 * _LANE) & 31
    below = (1 << sh) - 1
    out = torch.zeros(tiles, WARPS, 4, 2, 2, LANES, dtype=torch.int64)
    for kc in range(4):
        for jj in range(2):
            for bc in range(2):
                j = table_slot(half, kc * 4 + bc * 2 + jj)  # (32,) table slot per lane
                word = stored_word[:, :, j]  # (tiles, 4, 32)
                rank = stored_base[:, :, j] + popc(word & below)
                v0 = torch.gather(buf, 1, rank.reshape(tiles, -1)).reshape(rank.shape)
                v1 = torch.gather(buf, 1, (rank + 1).reshape(tiles, -1)).reshape(rank.shape)
                amount = rotate_right(word, (sh - 4) & 31) & 0x30  # 16 x the lane's 2 bits
                sel = (SEL_TABLE >> amount) & 0xFFFFFFFF
                out[:, :, kc, jj, bc] = prmt(v0, v1, sel)
    return out


def highest_bit(v: torch.Tensor) -> torch.Tensor:
    """``31 - __clz(v)`` of 32-bit patterns: the highest set bit, -1 for 0 (0xffffffff in u32)."""
    bits = (v[..., None] >> torch.arange(32)) & 1
    return torch.where(bits.any(-1), (bits * torch.arange(1, 33)).amax(-1) - 1, -1)


def bitmap_scattered_rows(w: BitmapWeight, stale: Optional[int] = 0x7E00, value_cap: int = 4096) -> torch.Tensor:
    """The scatter decode's dense tiles: (tiles, warp, 1024) 16-bit patterns of each warp's 16 rows
    (half-block j at 32 j, element p of it at 32 j + p), as `scatter_half` leaves them.

    Each lane starts one past its half-block's last value (table base + popcount) and takes two
    bits per trip from the top: the highest left with the value before its pointer, the next with
    the one before that (a load that may reach before the run; its store is predicated off when no
    bit is left). The tile starts zeroed, as the kernel's zero_rows leaves it."""
    masks = w.masks.to(torch.int64).reshape(-1, 128, 4)
    words = masks[..., 0] | (masks[..., 1] << 8) | (masks[..., 2] << 16) | (masks[..., 3] << 24)
    word, base = bitmap_table(words)  # (tiles, warp, lane)
    buf = _bitmap_stage_values(w, stale, value_cap)
    tiles = words.shape[0]
    rows = torch.zeros(tiles, WARPS, LANES, 33, dtype=torch.int64)  # column 32: discarded stores
    src = base + popc(word)
    flat = lambda t: t.reshape(tiles, -1)  # noqa: E731
    while bool((word != 0).any()):
        live = word != 0
        p0 = highest_bit(word)
        word = torch.where(live, word ^ (1 << p0.clamp(min=0)), word)
        p1 = highest_bit(word)
        v0 = torch.gather(buf, 1, flat((src - 1).clamp(min=0))).reshape(src.shape)
        v1 = torch.gather(buf, 1, flat((src - 2).clamp(min=0))).reshape(src.shape)
        rows.scatter_(-1, torch.where(live, p0, 32)[..., None], v0[..., None])
        second = live & (p1 >= 0)
        rows.scatter_(-1, torch.where(second, p1, 32)[..., None], v1[..., None])
        word = torch.where(second, word ^ (1 << p1.clamp(min=0)), word)
        src = torch.where(live, src - 2, src)
    return rows[..., :32].reshape(tiles, WARPS, LANES * 32)


def bitmap_scatter_b_fragments(w: BitmapWeight, stale: Optional[int] = 0x7E00, value_cap: int = 4096) -> torch.Tensor:
    """`bitmap_b_fragments` for the scatter decode: ldmatrix.x4 per piece kc, lane l addressing
    half 256 kc + 8 l of the warp's rows, matrix q = (bc = q / 2, jj = q % 2)."""
    rows = bitmap_scattered_rows(w, stale, value_cap)
    out = torch.zeros(rows.shape[0], WARPS, 4, 2, 2, LANES, dtype=torch.int64)
    for kc in range(4):
        regs = ldmatrix(rows, (256 * kc + 8 * _LANE).expand(*rows.shape[:2], LANES))  # (..., 32, 4)
        for jj in range(2):
            for bc in range(2):
                out[:, :, kc, jj, bc] = regs[..., 2 * bc + jj]
    return out


def bitmap_fragments(w: BitmapWeight, stale: Optional[int] = 0x7E00, decode: str = "fragment",
                     value_cap: int = 4096) -> torch.Tensor:
    """The B-fragment registers of the bitmap kernel compiled with FLASHLLM_DECODE = `decode` and
    FLASHLLM_VALCAP = `value_cap`."""
    if decode == "fragment":
        return bitmap_b_fragments(w, stale, value_cap)
    if decode == "scatter":
        return bitmap_scatter_b_fragments(w, stale, value_cap)
    raise ValueError(f"unknown bitmap decode {decode!r}")


def bitmap_decoded(w: BitmapWeight, stale: Optional[int] = 0x7E00, decode: str = "fragment",
                   value_cap: int = 4096) -> torch.Tensor:
    """The dense weight as the bitmap kernel's registers hold it (same dtype; compare bitwise)."""
    frags = bitmap_fragments(w, stale, decode, value_cap)
    tm, tk = -(-w.shape[0] // GROUP_M), -(-w.shape[1] // GROUP_K)
    tile = torch.zeros(tm * tk, GROUP_M, GROUP_K, dtype=torch.int64)
    for wp in range(WARPS):
        for kc in range(4):
            for jj in range(2):
                for bc in range(2):
                    reg = frags[:, wp, kc, jj, bc]
                    rows = 16 * wp + 8 * jj + _G
                    cols = 16 * kc + 8 * bc + 2 * _T
                    tile[:, rows, cols] = reg & 0xFFFF
                    tile[:, rows, cols + 1] = (reg >> 16) & 0xFFFF
    dense = tile.reshape(tm, tk, GROUP_M, GROUP_K).transpose(1, 2).reshape(tm * GROUP_M, tk * GROUP_K)
    bits = dense[: w.shape[0], : w.shape[1]]
    return bits.to(torch.int32).to(torch.int16).view(w.dtype)


# ---------------------------------------------------------------------------------------------
# The expansion kernels (prefill: the dense weight written out for cuBLAS)
# ---------------------------------------------------------------------------------------------
def bitmap_expanded(w: BitmapWeight, tiles_per_block: Optional[int] = None) -> torch.Tensor:
    """The dense weight `flashllm_bitmap_expand` writes (as value bits in `w`'s dtype, M x K): each
    block's `tiles_per_block` tiles' runs copied into one shared stage, whose unwritten rest holds
    stale bits (-1 here: a read of it shows in the result), and decoded from there."""
    from .bitmap_cuda import KERNEL

    tiles_per_block = tiles_per_block or KERNEL.expand_tiles
    m, k = w.shape
    k_tiles = -(-k // GROUP_K)
    tiles = w.offsets.numel() - 1
    blocks = -(-tiles // tiles_per_block)
    offsets = w.offsets.to(torch.int64)
    masks = w.masks.to(torch.int64).view(tiles, 256, 2)
    pair = masks[:, :, 0] | masks[:, :, 1] << 8  # the little-endian 16-bit load of each thread
    count = popc(pair)
    warp_count = count.view(tiles, 8, LANES)
    inclusive = warp_count.cumsum(dim=2)  # the shuffle scan
    warp_totals = inclusive[:, :, -1]
    earlier_warps = warp_totals.cumsum(dim=1) - warp_totals
    tile = torch.arange(tiles)[:, None]
    first = tile // tiles_per_block * tiles_per_block  # the block's first tile
    within = (inclusive - warp_count + earlier_warps[:, :, None]).view(tiles, 256)
    source = offsets[:-1, None] - offsets[first] + within  # into the block's stage
    values = w.values.view(torch.int16).to(torch.int64) & 0xFFFF  # fp16 and bf16 alike: bits
    stage = torch.full((blocks, tiles_per_block * GROUP_M * GROUP_K), -1, dtype=torch.int64)
    for b in range(blocks):
        begin, end = offsets[b * tiles_per_block], offsets[min((b + 1) * tiles_per_block, tiles)]
        assert 0 <= end - begin <= stage.shape[1], "the kernel traps on a run longer than its stage"
        stage[b, : end - begin] = values[begin:end]
    block = (tile // tiles_per_block).expand(tiles, 256)
    t = torch.arange(256)[None, :]
    tile_row, tile_col = tile // k_tiles, tile % k_tiles
    dense = torch.full((m, k), -1, dtype=torch.int64)  # anything not stored stays -1: a test catches it
    for j in range(2):
        b = 2 * t + j
        byte = (pair >> (8 * j)) & 0xFF
        row = tile_row * 64 + (b >> 7) * 16 + ((b >> 3) & 1) * 8 + (b & 7)
        col = tile_col * 64 + ((b >> 5) & 3) * 16 + ((b >> 4) & 1) * 8
        nxt = source.clone()
        for c in range(8):
            bit = (byte >> c) & 1
            piece = torch.where(bit.bool(), stage[block, torch.where(bit.bool(), nxt, 0)], 0)
            nxt = nxt + bit
            keep = (row < m) & (col + c < k)
            dense[row[keep], (col + c)[keep]] = piece[keep]
        source = nxt
    return dense


def tiled_csl_expanded(w: TiledCSLWeight) -> torch.Tensor:
    """The dense weight `flashllm_tiled_csl_expand` writes (as value bits in `w`'s dtype, M x K)."""
    m, k = w.shape
    k_tiles = -(-k // TILE_K)
    tiles = w.offsets.numel() - 1
    chunks = TILE_ELEMS // 8
    words = w.words.to(torch.int64) & 0xFFFFFFFF
    shared = torch.zeros(tiles, (chunks + 1) * 8, dtype=torch.int64)  # the zeroed tile + the sentinel slot
    tile_of_word = torch.arange(tiles).repeat_interleave(w.offsets.diff().to(torch.int64))
    shared[tile_of_word, _slot_half(words)] = words & 0xFFFF
    c = torch.arange(chunks)
    held = c ^ ((c >> 3) & 7)  # chunk c of the tile, as the swizzle placed it
    tile = torch.arange(tiles)[:, None]
    row = tile // k_tiles * TILE_M + c // (TILE_K // 8)
    col = tile % k_tiles * TILE_K + (c % (TILE_K // 8)) * 8
    dense = torch.full((m, k), -1, dtype=torch.int64)  # anything not stored stays -1: a test catches it
    for e in range(8):
        keep = (row < m) & (col + e < k)
        dense[row[keep], (col + e)[keep]] = shared[:, held * 8 + e][keep]
    return dense


# ---------------------------------------------------------------------------------------------
# Tiled-CSL
# ---------------------------------------------------------------------------------------------
def _slot_half(words: torch.Tensor, tile_elems: int = TILE_ELEMS) -> torch.Tensor:
    """`store_word_if` (common.cuh): the 16-bit shared slot a word's value is stored in, its byte
    offset (the word's high half) clamped to the spare slot past a tile of `tile_elems`, halved."""
    return (words >> 16).clamp(max=2 * tile_elems) >> 1


def tiled_csl_shared_tiles(w: TiledCSLWeight, words_per_stage: int) -> torch.Tensor:
    """(tiles, CSL_DENSE_SLOTS) shared dense tiles after the kernel's scatter: the first
    `words_per_stage` words from the prefetched stage, the rest in reloaded pieces of that size."""
    tiles = w.offsets.numel() - 1
    out = torch.zeros(tiles, CSL_DENSE_SLOTS, dtype=torch.int64)
    words = w.words.to(torch.int64) & 0xFFFFFFFF
    off = w.offsets.to(torch.int64)
    for t in range(tiles):
        start, count = int(off[t]), min(max(int(off[t + 1] - off[t]), 0), TILE_ELEMS)
        for done in range(0, count, words_per_stage):
            piece = words[start + done : start + min(count, done + words_per_stage)]
            out[t, _slot_half(piece)] = piece & 0xFFFF
    return out


def tiled_csl_b_fragments(w: TiledCSLWeight, words_per_stage: int = 2048) -> torch.Tensor:
    """Every B-fragment register the Tiled-CSL kernel's ldmatrix.x4 reads: (tiles, warp, kc, h, 4, 32)
    with registers (b00, b01, b10, b11) = (rows 0-7 k 0-7, rows 0-7 k 8-15, rows 8-15 k 0-7,
    rows 8-15 k 8-15) of rows 32 warp + 16 h.."""
    shared = tiled_csl_shared_tiles(w, words_per_stage)
    tiles = shared.shape[0]
    out = torch.zeros(tiles, WARPS, 4, 2, 4, LANES, dtype=torch.int64)
    q = _LANE >> 3
    for wp in range(WARPS):
        for h in range(2):
            # b_offsets (in halves): step 0's row and swizzled chunk; step kc's is that XOR 16 kc
            row = wp * 32 + h * 16 + (q >> 1) * 8 + (_LANE & 7)
            step0 = row * TILE_K + (((q & 1) ^ (_LANE & 7)) << 3)
            for kc in range(4):
                addr = step0 ^ (kc << 4)
                out[:, wp, kc, h] = ldmatrix(shared, addr.expand(tiles, LANES)).permute(0, 2, 1)
    return out


def tiled_csl_decoded(w: TiledCSLWeight, words_per_stage: int = 2048) -> torch.Tensor:
    """The dense weight as the Tiled-CSL kernel's B registers hold it (compare bitwise)."""
    frags = tiled_csl_b_fragments(w, words_per_stage)
    tm, tk = -(-w.shape[0] // TILE_M), -(-w.shape[1] // TILE_K)
    tile = torch.zeros(tm * tk, TILE_M, TILE_K, dtype=torch.int64)
    for wp in range(WARPS):
        for kc in range(4):
            for h in range(2):
                for r, (dr, dk) in enumerate(((0, 0), (0, 8), (8, 0), (8, 8))):
                    reg = frags[:, wp, kc, h, r]
                    rows = wp * 32 + h * 16 + dr + _G
                    cols = kc * 16 + dk + 2 * _T
                    tile[:, rows, cols] = reg & 0xFFFF
                    tile[:, rows, cols + 1] = (reg >> 16) & 0xFFFF
    dense = tile.reshape(tm, tk, TILE_M, TILE_K).transpose(1, 2).reshape(tm * TILE_M, tk * TILE_K)
    return dense[: w.shape[0], : w.shape[1]].to(torch.int32).to(torch.int16).view(w.dtype)


# ---------------------------------------------------------------------------------------------
# Whole kernels: partition, tensor cores, epilogue
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The launch geometry the emulated kernel runs with (what launch.py would compute)."""

    nrows: int
    split_k: int = 1
    strips: int = 1  # bitmap only
    decode: str = "fragment"  # bitmap only: configs.DECODES
    words_per_stage: int = 2048  # Tiled-CSL only
    persistent_blocks: int = 0  # bitmap only: stream-K blocks along the tile sequence (0 = off)
    cores: int = 0  # Tiled-CSL only: configs.LaunchConfig.cores (1 or 2: the same sums, per block or per warp)
    # Tiled-CSL only: at 8 rows one A load serves two k16 steps (A_STEPS), except with 8 warps and
    # one dense tile
    warps: int = 4
    dense_tiles: int = 2
    wgmma: bool = False  # Hopper's warpgroup MMA (FLASHLLM_WGMMA; bitmap: one strip, the fragment decode)


def split_ranges(k_tiles: int, split_k: int) -> list[range]:
    """The tiles of each block along K, as `launch.split_plan` and the kernels' kt0 / nk give them."""
    split_k = max(1, min(split_k, k_tiles))
    per = -(-k_tiles // split_k)
    blocks = -(-k_tiles // per)
    return [range(b * per, min(k_tiles, (b + 1) * per)) for b in range(blocks)]


def store_acc_targets(m8: int, n16: int, out_features: int, n: int, nrows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`store_acc` (common.cuh): for accumulator registers (32, 4) of the (n16, m8) tile, the
    (n, m) each one is written to and whether it is written at all."""
    m = m8 + 2 * _T[:, None] + torch.tensor([0, 1, 0, 1])[None, :]
    nn = n16 + _G[:, None] + torch.tensor([0, 0, 8, 8])[None, :]
    h_ok = torch.tensor([True, True, nrows != 8, nrows != 8])[None, :]
    ok = (m < out_features) & (nn < n) & h_ok
    return nn, m, ok


def _run_blocks(a_regs_for, b_regs_for, k_tiles: int, blocks_m: list[list[int]], m8_of, n_acc: int,
                x: torch.Tensor, out_features: int, bias: Optional[torch.Tensor], plan: Plan,
                steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared driver: every block (strip group, split, n chunk) accumulates its tiles with mma and
    stores through the epilogue. Returns (y, write count per element).

    Register fragments are turned into matrices once per (rows, tile) and the 4 k16 steps x NT
    mma of a tile are one einsum: the same products as the per-instruction chain, accumulated in
    fp32 per tile instead of per instruction (a rounding difference far below the tests' tolerance).
    With steps == 2 (N <= 8, `load_a_frags<2>`) the even and odd k16 steps accumulate separately
    and the odd steps' rows 8-15 are added to the even steps' rows 0-7 before the epilogue, as
    `fold_steps` does."""
    n = x.shape[0]
    dtype = x.dtype
    nt_count = max(1, plan.nrows // 16)
    splits = split_ranges(k_tiles, plan.split_k)
    ws = torch.zeros(n, out_features, dtype=torch.float32)
    y = torch.zeros(n, out_features, dtype=dtype)
    writes = torch.zeros(n, out_features, dtype=torch.int64)
    bias_f = None if bias is None else bias.to(torch.float32)
    a_cache: dict[tuple[int, int], torch.Tensor] = {}
    b_cache: dict[tuple[int, int], torch.Tensor] = {}

    def a_for(n0: int, kt: int) -> torch.Tensor:
        if (n0, kt) not in a_cache:
            a_cache[(n0, kt)] = a_matrix(a_regs_for(n0, kt), dtype)  # (4, NT, 16, 16)
        return a_cache[(n0, kt)]

    def b_for(strip: int, kt: int) -> torch.Tensor:
        if (strip, kt) not in b_cache:
            b_cache[(strip, kt)] = b_matrix(b_regs_for(strip, kt), dtype)  # (acc, 4, 16, 8)
        return b_cache[(strip, kt)]

    def accumulate(accs: torch.Tensor, n0: int, strip: int, kt: int) -> None:
        for p in range(steps):
            c = torch.einsum("knab,ikbc->inac", a_for(n0, kt)[p::steps], b_for(strip, kt)[:, p::steps])
            accs[p] = (accs[p].to(torch.float64) + c_registers(c)).to(torch.float32)

    def store(accs: torch.Tensor, n0: int, strip: int, to_workspace: bool) -> None:
        acc = accs[0]
        if steps == 2:
            acc[..., 0:2] += accs[1][..., 2:4]
        for i in range(n_acc):
            for nt in range(nt_count):
                nn, m, ok = store_acc_targets(m8_of(strip, i), n0 + nt * 16, out_features, n, plan.nrows)
                vals = acc[i, nt][ok]
                if to_workspace:
                    ws.index_put_((nn[ok], m[ok]), vals, accumulate=True)
                else:
                    b = 0.0 if bias_f is None else bias_f[m[ok]]
                    y[nn[ok], m[ok]] = (vals + b).to(dtype)
                writes[nn[ok], m[ok]] += 1

    def fresh() -> torch.Tensor:
        return torch.zeros(steps, n_acc, nt_count, LANES, 4, dtype=torch.float32)

    strips_all = [strip for group in blocks_m for strip in group]
    for z in range(-(-n // plan.nrows)):
        n0 = z * plan.nrows
        if plan.persistent_blocks:
            # Stream-K (FLASHLLM_PERSISTENT): each block walks its share of the strip-major tile
            # sequence and adds every strip it touched into the workspace.
            for tiles in persistent_ranges(len(strips_all) * k_tiles, plan.persistent_blocks):
                accs = fresh()
                for f in tiles:
                    strip, kt = divmod(f, k_tiles)
                    accumulate(accs, n0, strip, kt)
                    if kt == k_tiles - 1 or f == tiles[-1]:
                        store(accs, n0, strip, True)
                        accs = fresh()
            continue
        for kts in splits:
            for strips in blocks_m:
                for strip in strips:
                    accs = fresh()
                    for kt in kts:
                        accumulate(accs, n0, strip, kt)
                    store(accs, n0, strip, len(splits) > 1)
    if len(splits) > 1 or plan.persistent_blocks:
        # flashllm_splitk_finalize: round once, bias added in fp32; writes counts the red.adds.
        y = (ws + (0.0 if bias_f is None else bias_f)).to(dtype)
    return y, writes


def bitmap_kernel(x: torch.Tensor, w: BitmapWeight, bias: Optional[torch.Tensor], plan: Plan,
                  stale: Optional[int] = 0x7E00) -> tuple[torch.Tensor, torch.Tensor]:
    """The bitmap kernel's output (and per-element write counts) for x (N, K), emulated."""
    if plan.wgmma:
        return bitmap_wgmma_kernel(x, w, bias, plan, stale)
    out_features, in_features = w.shape
    tm, tk = -(-out_features // GROUP_M), -(-in_features // GROUP_K)
    frags = bitmap_fragments(w, stale, plan.decode).reshape(tm, tk, WARPS, 4, 2, 2, LANES)
    xp, kx = padded_activations(x, in_features)
    groups = [[s for s in range(g * plan.strips, (g + 1) * plan.strips) if s < tm]
              for g in range(-(-tm // plan.strips))]

    steps = 2 if plan.nrows == 8 else 1  # bitmap_spmm.cu: A_STEPS

    def a_regs(n0, kt):
        return a_fragments(stage_x(xp, plan.nrows, n0, kt * GROUP_K, kx), plan.nrows, steps)

    def b_regs(strip, kt):
        # accumulator i = (warp, jj): B registers (b0, b1) = blocks (bc 0, bc 1) of rows 8jj..
        f = frags[strip, kt]  # (warp, kc, jj, bc, 32)
        return f.permute(0, 2, 1, 4, 3).reshape(WARPS * 2, 4, LANES, 2)

    def m8_of(strip, i):
        return strip * GROUP_M + (i // 2) * 16 + (i % 2) * 8

    return _run_blocks(a_regs, b_regs, tk, groups, m8_of, WARPS * 2, x, out_features, bias, plan, steps)


def row_copies(row: torch.Tensor) -> torch.Tensor:
    """`csl::RowCopiesStager`: a staged activation row's 64 16-bit patterns -> (512,), 8 copies of
    the row, copy r's 16-byte chunk c holding the row's chunk c ^ r (thread t copies chunk t)."""
    chunks = row[:TILE_K].reshape(8, 8)
    copy, chunk = torch.arange(8)[:, None], torch.arange(8)[None, :]
    return chunks[chunk ^ copy].reshape(8 * TILE_K)


def tiled_csl_core_terms(words: torch.Tensor, copies: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`csl::add_words` on a tile's words (int64 bit patterns): per word, the row of the sums it adds
    into (byte slot & 0x3f80 of a lane's column: the sentinel's zero goes to row 0) and the fp32
    product value * activation, the activation read at byte slot & 0x3fe of the row copies."""
    slot = words >> 16
    rows = (slot & 0x3F80) >> 7
    x = halves_to_float(copies[(slot & 0x3FE) >> 1], dtype).to(torch.float32)
    return rows, halves_to_float(words & 0xFFFF, dtype).to(torch.float32) * x


def tiled_csl_cores_kernel(x: torch.Tensor, w: TiledCSLWeight, bias: Optional[torch.Tensor],
                           plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The Tiled-CSL kernel's CUDA-core path (FLASHLLM_CORES, one activation row), emulated: each
    (strip, split) block's fp32 row sums over its tiles' words, rounded with the bias or added into
    the split-K workspace. The kernel's sums are per lane and added in whatever order the warps
    reach them; here they are added per tile, a rounding difference far below the tolerance."""
    if x.shape[0] != 1:
        raise ValueError(f"the CUDA-core path multiplies one activation row, got {x.shape[0]}")
    out_features, in_features = w.shape
    tm, tk = -(-out_features // TILE_M), -(-in_features // TILE_K)
    xp, kx = padded_activations(x, in_features)
    words = w.words.to(torch.int64) & 0xFFFFFFFF
    off = w.offsets.to(torch.int64)
    splits = split_ranges(tk, plan.split_k)
    ws = torch.zeros(1, out_features, dtype=torch.float32)
    y = torch.zeros(1, out_features, dtype=x.dtype)
    writes = torch.zeros(1, out_features, dtype=torch.int64)
    bias_f = None if bias is None else bias.to(torch.float32)
    for kts in splits:
        for strip in range(tm):
            sums = torch.zeros(TILE_M, dtype=torch.float32)
            for kt in kts:
                copies = row_copies(stage_x(xp, 8, 0, kt * TILE_K, kx)[0])
                t = strip * tk + kt
                start, count = int(off[t]), min(max(int(off[t + 1] - off[t]), 0), TILE_ELEMS)
                rows, terms = tiled_csl_core_terms(words[start : start + count], copies, x.dtype)
                sums.index_add_(0, rows, terms)
            m = strip * TILE_M + torch.arange(TILE_M)
            ok = m < out_features
            if len(splits) > 1:
                ws[0, m[ok]] += sums[ok]
            else:
                y[0, m[ok]] = (sums[ok] + (0.0 if bias_f is None else bias_f[m[ok]])).to(x.dtype)
            writes[0, m[ok]] += 1
    if len(splits) > 1:  # flashllm_splitk_finalize
        y = (ws + (0.0 if bias_f is None else bias_f)).to(x.dtype)
    return y, writes


def tiled_csl_kernel(x: torch.Tensor, w: TiledCSLWeight, bias: Optional[torch.Tensor],
                     plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The Tiled-CSL kernel's output (and per-element write counts) for x (N, K), emulated."""
    if plan.cores:
        return tiled_csl_cores_kernel(x, w, bias, plan)
    if plan.wgmma:
        return tiled_csl_wgmma_kernel(x, w, bias, plan)
    out_features, in_features = w.shape
    tm, tk = -(-out_features // TILE_M), -(-in_features // TILE_K)
    frags = tiled_csl_b_fragments(w, plan.words_per_stage).reshape(tm, tk, WARPS, 4, 2, 4, LANES)
    xp, kx = padded_activations(x, in_features)
    steps = 2 if plan.nrows == 8 and (plan.warps == 4 or plan.dense_tiles == 2) else 1  # A_STEPS

    def a_regs(n0, kt):
        return a_fragments(stage_x(xp, plan.nrows, n0, kt * TILE_K, kx), plan.nrows, steps)

    def b_regs(strip, kt):
        # accumulator mt = 2h + j: (b0, b1) = registers (b00, b01) for j = 0, (b10, b11) for j = 1
        f = frags[strip, kt]  # (warp, kc, h, 4, 32)
        f = f.reshape(WARPS, 4, 2, 2, 2, LANES)  # (warp, kc, h, j, reg, 32)
        return f.permute(0, 2, 3, 1, 5, 4).reshape(WARPS * 4, 4, LANES, 2)

    def m8_of(strip, i):
        return strip * TILE_M + (i // 4) * 32 + (i % 4) * 8

    return _run_blocks(a_regs, b_regs, tk, [[s] for s in range(tm)], m8_of, WARPS * 4, x, out_features, bias, plan,
                       steps)


# ---------------------------------------------------------------------------------------------
# tiled_csl16 (cuda/tiled_csl16_spmm.cu, cuda/tiled_csl16_expand.cu)
# ---------------------------------------------------------------------------------------------
CSL16_DENSE_SLOTS = csl16.TILE_ELEMS + 8  # halves of a warp's dense tile (DENSE_BYTES / 2)


def tiled_csl16_shared_tiles(w: TiledCSL16Weight, words_per_stage: int) -> torch.Tensor:
    """(tiles, CSL16_DENSE_SLOTS) warp tiles after `csl16::scatter_run`: the first
    `words_per_stage` words of a run from the stage buffer, the rest straight from global memory,
    each value at its word's byte offset clamped to the spare slot."""
    tiles = w.offsets.numel() - 1
    out = torch.zeros(tiles, CSL16_DENSE_SLOTS, dtype=torch.int64)
    words = w.words.to(torch.int64) & 0xFFFFFFFF
    off = w.offsets.to(torch.int64)
    for t in range(tiles):
        start, count = int(off[t]), min(max(int(off[t + 1] - off[t]), 0), csl16.TILE_ELEMS)
        for piece in (words[start : start + min(count, words_per_stage)],
                      words[start + min(count, words_per_stage) : start + count]):
            out[t, _slot_half(piece, csl16.TILE_ELEMS)] = piece & 0xFFFF
    return out


def tiled_csl16_b_fragments(w: TiledCSL16Weight, words_per_stage: int = 256) -> torch.Tensor:
    """The B registers each lane loads per tile: (tiles, h, q, 32 lanes, 4), the 16 bytes at byte
    1024 h + 512 q + 16 lane of the warp's tile as 4 32-bit registers (halves: low = lower address)."""
    shared = tiled_csl16_shared_tiles(w, words_per_stage)
    tiles = shared.shape[0]
    halves = shared[:, : csl16.TILE_ELEMS].reshape(tiles, 2, 2, LANES, 4, 2)  # (tile, h, q, lane, reg, half)
    return halves[..., 0] | (halves[..., 1] << 16)


def tiled_csl16_decoded(w: TiledCSL16Weight, words_per_stage: int = 256) -> torch.Tensor:
    """The dense weight as the tiled_csl16 kernel's B registers hold it (compare bitwise): register
    (b0, b1) of k16 step kc are registers 2 (kc % 2), + 1 of b[h][kc // 2], holding rows 8 h + g and
    columns 16 kc + 2 t (+ 1) and + 8 (+ 9), as mma.m16n8k16 reads B."""
    frags = tiled_csl16_b_fragments(w, words_per_stage)
    grid = csl16.LAYOUT.grid(w.shape)
    tile = torch.zeros(grid[0] * grid[1], csl16.TILE_M, csl16.TILE_K, dtype=torch.int64)
    for h in range(2):
        for kc in range(4):
            for r, dk in enumerate((0, 8)):
                reg = frags[:, h, kc // 2, :, 2 * (kc % 2) + r]  # (tiles, 32)
                for e in range(2):
                    tile[:, 8 * h + _G, 16 * kc + dk + 2 * _T + e] = (reg >> (16 * e)) & 0xFFFF
    dense = csl16.from_storage_order(tile.reshape(grid[0] * grid[1], csl16.TILE_ELEMS), grid)
    return dense[: w.shape[0], : w.shape[1]]


def tiled_csl16_kernel(x: torch.Tensor, w: TiledCSL16Weight, bias: Optional[torch.Tensor],
                       plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled_csl16 kernel's output (and per-element write counts) for x (N, K), emulated. The
    activation chunks (128 / NROWS tiles staged at once) hold the same rows `stage_x` stages per
    tile; the block's warps (row groups) only share them, so each row group runs as its own block."""
    out_features, in_features = w.shape
    tm, tk = csl16.LAYOUT.grid(w.shape)
    frags = tiled_csl16_b_fragments(w, plan.words_per_stage).reshape(tm, tk, 2, 2, LANES, 4)
    xp, kx = padded_activations(x, in_features)
    steps = 2 if plan.nrows == 8 else 1  # A_STEPS

    def a_regs(n0, kt):
        return a_fragments(stage_x(xp, plan.nrows, n0, kt * csl16.TILE_K, kx), plan.nrows, steps)

    def b_regs(group, kt):
        f = frags[group, kt].reshape(2, 2, LANES, 2, 2)  # (h, q, lane, kc % 2, reg)
        return f.permute(0, 1, 3, 2, 4).reshape(2, 4, LANES, 2)  # (h, kc, lane, (b0, b1))

    def m8_of(group, i):
        return group * csl16.TILE_M + 8 * i

    return _run_blocks(a_regs, b_regs, tk, [[g] for g in range(tm)], m8_of, 2, x, out_features, bias, plan, steps)


def tiled_csl16_expanded(w: TiledCSL16Weight) -> torch.Tensor:
    """The dense weight `flashllm_tiled_csl16_expand` writes (value bits in `w`'s dtype, M x K):
    each warp's tile scattered (every word of the run), then output chunk c (row c / 8, columns
    8 (c % 8)..) gathered as the 4 32-bit pairs at word `first` + 4 t."""
    m, k = w.shape
    k_tiles = csl16.LAYOUT.grid(w.shape)[1]
    shared = tiled_csl16_shared_tiles(w, csl16.TILE_ELEMS)
    tiles = shared.shape[0]
    pairs = shared[:, : csl16.TILE_ELEMS].reshape(tiles, -1, 2)
    pairs = pairs[..., 0] | (pairs[..., 1] << 16)  # (tiles, 512) 32-bit words
    c = torch.arange(csl16.TILE_ELEMS // 8)
    r, mm = c >> 3, c & 7
    s, hi = mm >> 1, mm & 1
    first = (1024 * (r >> 3) + 512 * (s >> 1) + 64 * (r & 7) + 4 * (2 * (s & 1) + hi)) >> 2
    tile = torch.arange(tiles)[:, None]
    row = tile // k_tiles * csl16.TILE_M + r
    col = tile % k_tiles * csl16.TILE_K + mm * 8
    dense = torch.full((m, k), -1, dtype=torch.int64)  # anything not stored stays -1: a test catches it
    for e in range(8):
        value = (pairs[:, first + 4 * (e >> 1)] >> (16 * (e & 1))) & 0xFFFF
        keep = (row < m) & (col + e < k)
        dense[row[keep], (col + e)[keep]] = value[keep]
    return dense


# ---------------------------------------------------------------------------------------------
# Both kernels through Hopper's warpgroup MMA (FLASHLLM_WGMMA)
# ---------------------------------------------------------------------------------------------
def sw128_addresses(start: int, rows: int) -> torch.Tensor:
    """The shared-memory byte addresses (rows, 16) a wgmma reads for a K-major operand of `rows`
    rows x 16 k in the 128-byte swizzle from descriptor start address `start` (relative to a
    1024-byte aligned base; stride offset 1024 bytes): row r, k at start + 1024 (r // 8) + 128 (r %
    8) + 2 k, its 16-byte chunk (address bits 4-6) XORed with its row in the 8-row group (bits 7-9),
    as the PTX ISA's 128-byte swizzle mode does. The kernel's slices start 32 bytes per k16 step into
    a 1024-byte aligned group (`sw128_desc`)."""
    r = torch.arange(rows)[:, None]
    k = torch.arange(16)[None, :]
    a = start + 1024 * (r // 8) + 128 * (r % 8) + 2 * k
    return a ^ (((a >> 7) & 7) << 4)


def wgmma_operand(buf: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """(..., rows, 16) 16-bit patterns a wgmma reads from shared buffers `buf` (..., halves)."""
    return buf[..., sw128_addresses(start, rows) // 2]


def stage_x_sw128(x: torch.Tensor, nrows: int, n0: int, k0: int, kx: int) -> torch.Tensor:
    """`XStagerT<true>` (common.cuh): the staged activation tile as (nrows * 64,) 16-bit patterns, row
    n's 16-byte chunk c at chunk c ^ (n % 8) of its 128-byte row (thread t copies chunk t % 8 of row
    t / 8 to byte 128 (t / 8) + 16 ((t % 8) ^ (t / 8 % 8)), and in each later pass the rows THREADS /
    8 further), zero past N and past the kx valid columns."""
    plain = stage_x(x, nrows, n0, k0, kx)[:, :64].reshape(nrows, 8, 8)
    out = torch.empty_like(plain)
    r = torch.arange(nrows)[:, None]
    c = torch.arange(8)[None, :]
    out[r, c ^ (r % 8)] = plain[r.expand(-1, 8), c.expand(nrows, -1)]
    return out.reshape(-1)


def tiled_csl_wgmma_a(w: TiledCSLWeight, words_per_stage: int = 2048) -> torch.Tensor:
    """The A operands the kernel's wgmma read from each scattered dense tile: (tiles, half, kc, 64,
    16) 16-bit patterns, half h's rows 64 h.., k16 step kc's slice starting at 8192 h + 32 kc."""
    shared = tiled_csl_shared_tiles(w, words_per_stage)
    return torch.stack([torch.stack([wgmma_operand(shared, h * 64 * 128 + kc * 32, 64) for kc in range(4)], 1)
                        for h in range(2)], 1)


def tiled_csl_wgmma_decoded(w: TiledCSLWeight, words_per_stage: int = 2048) -> torch.Tensor:
    """The dense weight as the wgmma path's A operands hold it (compare bitwise)."""
    a = tiled_csl_wgmma_a(w, words_per_stage)
    tm, tk = -(-w.shape[0] // TILE_M), -(-w.shape[1] // TILE_K)
    tile = a.permute(0, 1, 3, 2, 4).reshape(tm * tk, TILE_M, TILE_K)  # (tile, 64 h + r, 16 kc + k)
    dense = tile.reshape(tm, tk, TILE_M, TILE_K).transpose(1, 2).reshape(tm * TILE_M, tk * TILE_K)
    return dense[: w.shape[0], : w.shape[1]].to(torch.int32).to(torch.int16).view(w.dtype)


def wgmma_d_layout(nrows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m64nNk16 accumulators (PTX ISA, wgmma D fragments), N = nrows: the row and column of
    register i of thread t, (128, nrows / 2) each: warp w's 16 rows, then mma.m16n8's C layout in
    every 8 columns."""
    t = torch.arange(4 * LANES)[:, None]
    i = torch.arange(nrows // 2)[None, :]
    lane = t & 31
    row = 16 * (t >> 5) + (lane >> 2) + 8 * ((i % 4) >> 1)
    col = 8 * (i // 4) + 2 * (lane & 3) + (i & 1)
    return row, col


def store_half_targets(d: torch.Tensor, m0: int, n0: int, out_features: int, n: int
                       ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`store_half` (common.cuh) on registers d (128, nrows / 2): per store, (values, n, m, whether it is
    stored) of every thread, after the shuffle with lane ^ 4 that pairs rows m, m + 1."""
    t = torch.arange(4 * LANES)
    lane = t & 31
    odd = ((lane >> 2) & 1).bool()
    out = []
    for e2 in range(2):
        m = m0 + 16 * (t >> 5) + (lane >> 2) + 8 * e2 - odd.long()
        for j in range(d.shape[1] // 4):
            at_n, at_n1 = d[:, 4 * j + 2 * e2], d[:, 4 * j + 2 * e2 + 1]
            other = torch.where(odd, at_n, at_n1)[t ^ 4]  # __shfl_xor_sync(..., 4)
            nn = n0 + 8 * j + 2 * (lane & 3) + odd.long()
            live = (m < out_features) & (nn < n)
            out.append((torch.where(odd, other, at_n), nn, m, live))
            out.append((torch.where(odd, at_n1, other), nn, m + 1, live & (m + 1 < out_features)))
    return out


def _wgmma_blocks(a_for, tm: int, tk: int, rows: int, x: torch.Tensor, out_features: int,
                  bias: Optional[torch.Tensor], plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared driver of the warpgroup-MMA kernels: every block (strip of `rows` weight rows, split, N
    chunk) sums its tiles' products, a_for(strip, kt) (rows / 64 halves, 4 k16 steps, 64, 16) float64
    A operands against the swizzled activation stage as the B operand, spreads each 64-row half over
    the threads' registers as the hardware does and stores it through `store_half`. Returns (y,
    write count per element). Sums are kept per tile in float64 and rounded to fp32 per tile, as
    `_run_blocks` does (the hardware rounds per instruction)."""
    n, dtype, nrows = x.shape[0], x.dtype, plan.nrows
    xp, kx = padded_activations(x, x.shape[1])
    row, col = wgmma_d_layout(nrows)
    splits = split_ranges(tk, plan.split_k)
    ws = torch.zeros(n, out_features, dtype=torch.float32)
    y = torch.zeros(n, out_features, dtype=dtype)
    writes = torch.zeros(n, out_features, dtype=torch.int64)
    bias_f = None if bias is None else bias.to(torch.float32)
    for z in range(-(-n // nrows)):
        n0 = z * nrows
        b = {kt: halves_to_float(torch.stack([wgmma_operand(stage_x_sw128(xp, nrows, n0, kt * 64, kx), kc * 32, nrows)
                                              for kc in range(4)]), dtype)
             for kt in range(tk)}  # (kc, nrows, 16)
        for kts in splits:
            for strip in range(tm):
                acc = torch.zeros(rows // 64, 64, nrows, dtype=torch.float32)
                for kt in kts:
                    acc = (acc.double() + torch.einsum("hcrk,cnk->hrn", a_for(strip, kt), b[kt])).float()
                for h in range(rows // 64):
                    for vals, nn, m, live in store_half_targets(acc[h][row, col], strip * rows + 64 * h, n0,
                                                                out_features, n):
                        if len(splits) > 1:
                            ws.index_put_((nn[live], m[live]), vals[live], accumulate=True)
                        else:
                            bb = 0.0 if bias_f is None else bias_f[m[live]]
                            y[nn[live], m[live]] = (vals[live] + bb).to(dtype)
                        writes.index_put_((nn[live], m[live]), torch.ones_like(m[live]), accumulate=True)
    if len(splits) > 1:  # flashllm_splitk_finalize
        y = (ws + (0.0 if bias_f is None else bias_f)).to(dtype)
    return y, writes


def tiled_csl_wgmma_kernel(x: torch.Tensor, w: TiledCSLWeight, bias: Optional[torch.Tensor],
                           plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The Tiled-CSL kernel through the warpgroup MMA, emulated: the wgmma's views of the scattered
    dense tiles (two 64-row halves) against the swizzled activation stages (`_wgmma_blocks`)."""
    out_features, in_features = w.shape
    tm, tk = -(-out_features // TILE_M), -(-in_features // TILE_K)
    a = halves_to_float(tiled_csl_wgmma_a(w, plan.words_per_stage), x.dtype).reshape(tm, tk, 2, 4, 64, 16)
    return _wgmma_blocks(lambda strip, kt: a[strip, kt], tm, tk, TILE_M, x, out_features, bias, plan)


def bitmap_wgmma_a(w: BitmapWeight, stale: Optional[int] = 0x7E00, value_cap: int = 4096) -> torch.Tensor:
    """The A registers the bitmap kernel hands each wgmma (FLASHLLM_WGMMA): (tiles, kc, warp, 32, 4),
    the fragment decode's blocks (jj, bc) = (0, 0), (1, 0), (0, 1), (1, 1) as a0..a3."""
    f = bitmap_fragments(w, stale, "fragment", value_cap)  # (tiles, warp, kc, jj, bc, 32)
    regs = torch.stack([f[:, :, :, 0, 0], f[:, :, :, 1, 0], f[:, :, :, 0, 1], f[:, :, :, 1, 1]], -1)
    return regs.permute(0, 2, 1, 3, 4)  # (tiles, kc, warp, 32, 4)


def bitmap_wgmma_kernel(x: torch.Tensor, w: BitmapWeight, bias: Optional[torch.Tensor], plan: Plan,
                        stale: Optional[int] = 0x7E00) -> tuple[torch.Tensor, torch.Tensor]:
    """The bitmap kernel through the warpgroup MMA, emulated: each k16 step's A operand is the four
    warps' decoded registers in mma.m16n8k16's A layout (warp w rows 16 w..), one strip of 64 rows."""
    out_features, in_features = w.shape
    tm, tk = -(-out_features // GROUP_M), -(-in_features // GROUP_K)
    regs = bitmap_wgmma_a(w, stale).reshape(tm, tk, 4, WARPS, LANES, 4)
    a = a_matrix(regs, x.dtype).reshape(tm, tk, 4, WARPS * 16, 16).unsqueeze(2)  # (tm, tk, 1, kc, 64, 16)
    return _wgmma_blocks(lambda strip, kt: a[strip, kt], tm, tk, GROUP_M, x, out_features, bias, plan)
