"""CPU checks of the CUDA kernels' design, through their lane-level emulation (kernels/emulation.py).

No GPU: what is checked is the index arithmetic the kernels are built from. Decoding each layout
the kernels' way must give `to_dense` bit for bit (stale shared memory included), the activation
fragments must be the PTX layout, every output element must be written exactly once, and the whole
emulated kernel must match a float64 product. Also: launch configurations, registration switch,
launcher input checks, and (where NVRTC or nvcc exists) that the kernel sources compile with the
shared-memory sizes configs.py computes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from flashllm.formats import BitmapWeight, TiledCSL16Weight, TiledCSLWeight
from flashllm.kernels import bitmap_cuda, configs, cuda_module, emulation as E, launch, tiled_csl_cuda
from flashllm.kernels.configs import LaunchConfig

DTYPES = (torch.float16, torch.bfloat16)
SPARSITIES = (0.0, 0.5, 0.8, 0.95, 1.0)
SHAPES = ((1, 1), (63, 65), (64, 64), (130, 70), (129, 200))


def pruned(m: int, k: int, sparsity: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(m, k, generator=gen)
    w[torch.rand(m, k, generator=gen) < sparsity] = 0
    if sparsity >= 1:
        w.zero_()
    return w.to(dtype)


@pytest.fixture
def gen():
    # Fresh inputs every run; failure messages print gen.initial_seed() to reproduce one.
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


# --- instruction semantics ------------------------------------------------------------------------
def test_prmt_matches_ptx_examples():
    a, b = 0x33221100, 0x77665544
    assert int(E.prmt(a, b, 0x3210)) == 0x33221100
    assert int(E.prmt(a, b, 0x7654)) == 0x77665544
    assert int(E.prmt(a, b, 0x0123)) == 0x00112233
    assert int(E.prmt(a, b, 0x4444)) == 0x44444444
    # bit 3 of a nibble replicates the sign bit of the selected byte
    assert int(E.prmt(0x000080FF, 0, 0x4489)) == 0x0000FFFF
    assert int(E.prmt(0x0000807F, 0, 0x4448)) == 0x00000000


def test_bitmap_selector_table_places_pairs():
    # The 4 selectors of bitmap_spmm.cu, for every combination of a lane's 2 mask bits.
    v0, v1 = 0xABCD, 0x1234  # zero-extended 16-bit loads
    expected = {0: 0, 1: 0xABCD, 2: 0xABCD << 16, 3: 0xABCD | (0x1234 << 16)}
    for bits, want in expected.items():
        sel = E.prmt(E.SEL_LO, E.SEL_HI, bits * 0x22 + 0x10)
        assert int(E.prmt(v0, v1, sel)) == want, bits
        # no selector nibble uses the sign-replicate bit, so prmt needs no masking (see common.cuh)
        assert all(((int(sel) >> (4 * i)) & 8) == 0 for i in range(4))


def test_popc():
    v = torch.tensor([0, 1, 0xFFFFFFFF, 0x80000000, 0x0F0F0F0F, 12345678])
    assert E.popc(v).tolist() == [bin(int(x)).count("1") for x in v]


def test_ldmatrix_rows_to_lanes():
    buf = torch.arange(256, dtype=torch.int64)[None]  # value = half index
    rows = torch.arange(8) * 16  # matrix rows at 0, 16, 32, ...
    regs = E.ldmatrix(buf, rows[None].expand(1, 8))[0, :, 0]
    for lane in range(32):
        start = (lane // 4) * 16 + 2 * (lane % 4)
        assert int(regs[lane]) == start | ((start + 1) << 16)


def test_mma_fragments_compute_a_product(gen):
    a = torch.randint(0, 1 << 16, (32, 4), generator=gen) & 0x3BFF3BFF  # finite fp16 patterns
    b = torch.randint(0, 1 << 16, (32, 2), generator=gen) & 0x3BFF3BFF
    a |= torch.randint(0, 1 << 16, (32, 4), generator=gen) << 16 & 0x3BFF0000
    b |= torch.randint(0, 1 << 16, (32, 2), generator=gen) << 16 & 0x3BFF0000
    am, bm = E.a_matrix(a, torch.float16), E.b_matrix(b, torch.float16)
    c = E.mma_m16n8k16(a, b, torch.float16)
    full = am @ bm
    for lane in range(32):
        g, t = lane // 4, lane % 4
        assert c[lane].tolist() == [full[g, 2 * t], full[g, 2 * t + 1], full[g + 8, 2 * t], full[g + 8, 2 * t + 1]]


# --- decoding each layout the kernels' way is exact -------------------------------------------------
@pytest.mark.parametrize("decode", configs.DECODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bitmap_lanes_decode_exactly(decode, dtype, sparsity, shape, gen):
    w = BitmapWeight.from_dense(pruned(*shape, sparsity, dtype, gen))
    # stale=None: whatever follows a tile's run in shared memory is random bits (NaN, inf, ...)
    decoded = E.bitmap_decoded(w, stale=None, decode=decode)
    assert torch.equal(decoded.view(torch.int16), w.to_dense().view(torch.int16)), f"seed {gen.initial_seed()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", (*SHAPES, (257, 1025)))
def test_expansion_kernels_write_the_dense_weight(dtype, sparsity, shape, gen):
    # The prefill path's expansion kernels: every element of M x K stored, with the right bits.
    dense = pruned(*shape, sparsity, dtype, gen)
    expected = dense.view(torch.int16).to(torch.int64) & 0xFFFF
    expected[dense == 0] = 0  # -0.0 is stored as a zero
    assert torch.equal(E.bitmap_expanded(BitmapWeight.from_dense(dense)), expected), f"seed {gen.initial_seed()}"
    assert torch.equal(E.tiled_csl_expanded(TiledCSLWeight.from_dense(dense)), expected), f"seed {gen.initial_seed()}"
    assert torch.equal(E.tiled_csl16_expanded(TiledCSL16Weight.from_dense(dense)), expected), f"seed {gen.initial_seed()}"


def test_bitmap_expansion_grid_matches_the_kernel():
    # The launch's grid (cuda_op) and the emulation take the tiles per block from bitmap_cuda; the
    # kernel's own constant must agree, or blocks would skip tiles or write others' twice.
    from flashllm.kernels import bitmap_cuda, launch

    source = launch.kernel_source("bitmap_expand.cu")
    assert re.search(r"constexpr int TILES = (\d+);", source).group(1) == str(bitmap_cuda.KERNEL.expand_tiles)


def test_bitmap_decodes_give_the_same_registers(gen):
    w = BitmapWeight.from_dense(pruned(130, 200, 0.7, torch.bfloat16, gen))
    assert torch.equal(E.bitmap_fragments(w, decode="fragment"), E.bitmap_fragments(w, decode="scatter"))


def test_highest_bit_is_31_minus_clz():
    v = torch.tensor([0, 1, 2, 3, 0x80000000, 0xFFFFFFFF, 0x00010000])
    assert E.highest_bit(v).tolist() == [-1, 0, 1, 1, 31, 31, 16]


def test_scatter_walk_takes_values_from_the_end_of_each_run(gen, monkeypatch):
    # Values are stored in bit order, so walking the bits from the top pairs the highest set bit
    # with the run's last value: a walk from the bottom with the same pointer must be detected.
    w = BitmapWeight.from_dense(pruned(64, 64, 0.5, torch.float16, gen))
    rows = E.bitmap_scattered_rows(w)
    real = E.highest_bit
    monkeypatch.setattr(E, "highest_bit", lambda v: torch.where(v != 0, real(v & -v), -1))  # lowest bit
    assert not torch.equal(E.bitmap_scattered_rows(w), rows)


def test_bitmap_table_is_a_prefix_count(gen):
    w = BitmapWeight.from_dense(pruned(128, 128, 0.6, torch.float16, gen))
    masks = w.masks.to(torch.int64).reshape(-1, 128, 4)
    words = masks[..., 0] | masks[..., 1] << 8 | masks[..., 2] << 16 | masks[..., 3] << 24
    entry_word, entry_base = E.bitmap_table(words)
    counts = E.popc(words)
    naive = torch.cumsum(counts, 1) - counts  # set bits in all earlier words of the tile
    assert torch.equal(entry_base.reshape(-1, 128), naive)
    assert torch.equal(entry_word.reshape(-1, 128), words)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", ((1, 1), (127, 63), (129, 130), (300, 70)))
@pytest.mark.parametrize("words_per_stage", (256, 2048, 8192))
def test_tiled_csl_lanes_decode_exactly(dtype, sparsity, shape, words_per_stage, gen):
    # 256 words per stage makes every tile denser than 3% take the piecewise reload path.
    w = TiledCSLWeight.from_dense(pruned(*shape, sparsity, dtype, gen))
    decoded = E.tiled_csl_decoded(w, words_per_stage)
    assert torch.equal(decoded.view(torch.int16), w.to_dense().view(torch.int16)), f"seed {gen.initial_seed()}"


def test_tiled_csl_slots_are_a_swizzle_within_rows():
    from flashllm.formats.tiled_csl import slot_of

    loc = torch.arange(8192)
    half = slot_of(loc) // 2  # the 16-bit shared slot the kernels store each location's value in
    assert torch.equal(half.sort().values, loc)
    assert torch.equal(half // 64, loc // 64)  # stays in its row
    assert int(slot_of(torch.tensor(8192))) == 2 * 8192  # sentinel -> spare slot
    words = torch.tensor([(2 * 8192) << 16, 65534 << 16, (2 * 70) << 16 | 5])
    assert E._slot_half(words).tolist() == [8192, 8192, 70]  # a corrupt slot is clamped to the spare one
    # the 8 rows one ldmatrix phase reads hit 8 different 16-byte bank groups
    for chunk in range(8):
        starts = slot_of(torch.arange(8) * 64 + chunk * 8) // 2
        assert len({int(s) % 64 // 8 for s in starts}) == 8


# --- activations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("nrows,steps", [(n, 1) for n in configs.NROWS] + [(8, 2)])
def test_activation_fragments_are_the_ptx_layout(nrows, steps, gen):
    n, k = nrows + 3, 150
    x = torch.randn(n, k, generator=gen).to(torch.float16)
    xp, kx = E.padded_activations(x, k)
    assert kx == 152 and torch.equal(xp[:, k:], torch.zeros(n, 2, dtype=torch.float16))
    for n0 in (0, nrows):
        for k0 in (0, 128):
            frags = E.a_fragments(E.stage_x(xp, nrows, n0, k0, kx), nrows, steps)
            want = torch.zeros(max(16, nrows), 64, dtype=torch.float64)
            rows, cols = min(nrows, n - n0), min(64, kx - k0)
            want[:rows, :cols] = xp[n0 : n0 + rows, k0 : k0 + cols].double()
            for kc in range(4):
                for nt in range(max(1, nrows // 16)):
                    got = E.a_matrix(frags[kc, nt], torch.float16)
                    expect = want[nt * 16 : nt * 16 + 16, kc * 16 : kc * 16 + 16]
                    if steps == 2:
                        # One x4 serves steps kc and kc ^ 1: the even step's columns in rows 0-7,
                        # the odd step's in rows 8-15 (where that step's results accumulate).
                        pair = (kc & ~1) * 16
                        expect = torch.cat([want[:8, pair : pair + 16], want[:8, pair + 16 : pair + 32]])
                    elif nrows == 8:
                        expect = expect.clone()
                        expect[8:] = 0  # x2 load: rows 8-15 are zero registers
                    assert torch.equal(got, expect), (nrows, n0, k0, kc, nt)


# --- the whole kernels, emulated ---------------------------------------------------------------------
def _reference_check(y, writes, x, w, bias, splits):
    ref = x.double() @ w.double().T + (0 if bias is None else bias.double())
    same_dtype = F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype).double()
    assert bool(torch.isfinite(y).all())
    err = (y.double() - ref).norm().item()
    bound = 2 * (same_dtype - ref).norm().item() + 1e-5 * ref.norm().item() + 1e-6
    assert err <= bound, f"err {err:.3e} > {bound:.3e}"
    # every output element gets exactly one store, or one reduction per split (or per block that ran
    # part of its strip: a tensor of counts)
    expected = splits if isinstance(splits, torch.Tensor) else torch.full_like(writes, splits)
    assert torch.equal(writes, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,sparsity,plan", [
    (200, 300, 19, 0.8, E.Plan(nrows=32, split_k=1, strips=1)),
    (200, 300, 19, 0.5, E.Plan(nrows=8, split_k=3, strips=2)),
    (130, 70, 1, 0.95, E.Plan(nrows=8, split_k=1, strips=2)),
    (65, 129, 40, 0.0, E.Plan(nrows=16, split_k=2, strips=1)),
    (64, 64, 5, 1.0, E.Plan(nrows=8, split_k=1)),
    (100, 200, 70, 0.8, E.Plan(nrows=64, split_k=1, strips=2)),
    (70, 130, 129, 0.8, E.Plan(nrows=128, split_k=2, strips=1)),
    (200, 300, 19, 0.8, E.Plan(nrows=16, split_k=3, strips=2, decode="scatter")),
    (130, 70, 1, 0.95, E.Plan(nrows=8, split_k=1, strips=1, decode="scatter")),
    (65, 129, 40, 0.0, E.Plan(nrows=64, split_k=2, strips=1, decode="scatter")),
])
def test_bitmap_kernel_emulated(dtype, m, k, n, sparsity, plan, gen):
    w = pruned(m, k, sparsity, dtype, gen)
    x = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(m, generator=gen).to(dtype) if n % 2 else None
    y, writes = E.bitmap_kernel(x, BitmapWeight.from_dense(w), bias, plan, stale=None)
    _reference_check(y, writes, x, w, bias, len(E.split_ranges(-(-k // 64), plan.split_k)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,sparsity,nrows,decode,blocks", [
    (200, 300, 19, 0.8, 32, "fragment", 7),   # 4 strips x 5 K tiles = 20 tiles: ranges of 2-3, across strips
    (200, 300, 5, 0.5, 8, "fragment", 1),     # one block walks every strip
    (130, 70, 17, 0.95, 16, "scatter", 6),    # one tile per block (G = T)
    (65, 600, 40, 0.0, 64, "fragment", 4),    # ranges longer than a strip's 10 K tiles
    (64, 64, 3, 1.0, 8, "fragment", 1),
])
def test_bitmap_stream_k_blocks_emulated(dtype, m, k, n, sparsity, nrows, decode, blocks, gen):
    # FLASHLLM_PERSISTENT: equal shares of the strip-major tile sequence, each strip's sums added
    # into the workspace by every block that ran part of it, rounded once by the finalize launch.
    w = pruned(m, k, sparsity, dtype, gen)
    x = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(m, generator=gen).to(dtype) if n % 2 else None
    plan = E.Plan(nrows=nrows, decode=decode, persistent_blocks=blocks)
    y, writes = E.bitmap_kernel(x, BitmapWeight.from_dense(w), bias, plan, stale=None)
    strips, k_tiles = -(-m // 64), -(-k // 64)
    ranges = configs.persistent_ranges(strips * k_tiles, blocks)
    assert [f for r in ranges for f in r] == list(range(strips * k_tiles)) and all(ranges)  # each tile once
    # every element of a strip is added once per block that ran any of that strip's tiles
    per_strip = [len({b for b, r in enumerate(ranges) for f in r if f // k_tiles == s}) for s in range(strips)]
    _reference_check(y, writes, x, w, bias, torch.tensor([per_strip[i // 64] for i in range(m)]).expand(n, m))


def check_bitmap_flag_option(field: str, spelling: str, option: str, define: str, smem: int, refusal: str):
    """A bitmap-only on/off kernel option: one define more and `smem` bytes more than the same launch
    without it (nrows 16, 3 stages), tracked as `option`, spelt `spelling`, refused for Tiled-CSL
    with `refusal` and for a non-bool value. Returns the option's launch."""
    on = LaunchConfig(nrows=16, **{field: True}).validate("bitmap")
    off = LaunchConfig(nrows=16)
    assert on.defines("bitmap") == {**off.defines("bitmap"), define: 1,
                                    "FLASHLLM_SMEM_BYTES": off.smem_bytes("bitmap") + smem}
    assert configs.unvalidated_options(on) == ([option] if option in configs.UNVALIDATED else [])
    assert configs.parse_options("bitmap", [spelling]) == {field: True}
    with pytest.raises(ValueError, match=refusal):
        LaunchConfig(nrows=16, words_per_stage=2048, **{field: True}).validate("tiled_csl")
    with pytest.raises(ValueError, match=f"{field} must be True or False"):
        LaunchConfig(nrows=16, **{field: 1}).validate("bitmap")
    return on


def test_offset_ring_is_a_bitmap_compile_option():
    on = check_bitmap_flag_option("offset_ring", "ring", "ring", "FLASHLLM_OFFSET_RING", 64,  # 16 bounds per strip
                                  "the offset ring is a bitmap option")
    off = LaunchConfig(nrows=16)
    assert replace(on, strips=2).smem_bytes("bitmap") == replace(off, strips=2).smem_bytes("bitmap") + 128
    tuning = configs.candidates("bitmap", 16, 0.8, unvalidated=True)
    assert any(c.offset_ring and c.persistent for c in tuning) and any(c.offset_ring and not c.persistent for c in tuning)
    assert {c.stages for f, c in configs.checked_variants() if c.offset_ring} >= {3, 6}  # look-ahead 4 and 10


def test_bulk_copy_is_a_bitmap_and_tiled_csl16_compile_option():
    on = check_bitmap_flag_option("bulk_copy", "bulk", "bulk", "FLASHLLM_BULK", 3 * 8,  # an mbarrier per stage
                                  "bulk copies of the weight are a bitmap and tiled_csl16 option")
    # tiled_csl16: a warp's stage mbarriers (16-byte padded) after its stages, per warp
    base = configs.default_config("tiled_csl16", 8, 0.8)
    bulk = replace(base, bulk_copy=True).validate("tiled_csl16")
    assert bulk.smem_bytes("tiled_csl16") == base.smem_bytes("tiled_csl16") + 4 * 32
    assert bulk.defines("tiled_csl16")["FLASHLLM_BULK"] == 1
    assert configs.parse_options("tiled_csl16", ["bulk"]) == {"bulk_copy": True}
    assert any(c.bulk_copy for c in configs.candidates("tiled_csl16", 8, 0.8))
    assert any(c.bulk_copy for f, c in configs.checked_variants() if f == "tiled_csl16")
    off = LaunchConfig(nrows=16)
    assert replace(on, stages=6).smem_bytes("bitmap") == replace(off, stages=6).smem_bytes("bitmap") + 48
    tuning = configs.candidates("bitmap", 16, 0.8, unvalidated=True)
    assert any(c.bulk_copy and c.stages == 6 for c in tuning) and any(c.bulk_copy and c.offset_ring for c in tuning)
    assert not any(c.bulk_copy for c in configs.candidates("bitmap", 16, 0.8)) or "bulk" not in configs.UNVALIDATED
    checked = [c for f, c in configs.checked_variants() if c.bulk_copy]
    assert {c.strips for c in checked} == {1, 2} and {c.decode for c in checked} == set(configs.DECODES)
    assert any(c.persistent for c in checked) and any(c.offset_ring for c in checked) and any(c.prefetch for c in checked)


def test_tiles_per_stage_is_a_bitmap_compile_option():
    on = LaunchConfig(nrows=16, tiles_per_stage=2).validate("bitmap")
    off = LaunchConfig(nrows=16)
    # twice the tile slots: the stage buffers double, the decode area does not
    stage_bytes = 512 + (4096 + 8) * 2 + 16 * 144
    assert on.defines("bitmap") == {**off.defines("bitmap"), "FLASHLLM_TPS": 2,
                                    "FLASHLLM_SMEM_BYTES": off.smem_bytes("bitmap") + 3 * stage_bytes}
    assert configs.unvalidated_options(on) == (["tps"] if "tps" in configs.UNVALIDATED else [])
    assert configs.parse_options("bitmap", ["tps2"]) == {"tiles_per_stage": 2}
    for bad in (dict(offset_ring=True), dict(bulk_copy=True), dict(persistent=True), dict(prefetch=4)):
        with pytest.raises(ValueError, match="several tiles per stage run the plain pipeline"):
            replace(on, **bad).validate("bitmap")
    with pytest.raises(ValueError, match="tiles_per_stage must be one of"):
        LaunchConfig(nrows=16, words_per_stage=2048, tiles_per_stage=2).validate("tiled_csl")
    with pytest.raises(ValueError, match="tiles_per_stage must be one of"):
        LaunchConfig(nrows=16, tiles_per_stage=3).validate("bitmap")
    assert any(c.tiles_per_stage == 2 for c in configs.candidates("bitmap", 16, 0.8, unvalidated=True))
    checked = [c for f, c in configs.checked_variants() if c.tiles_per_stage == 2]
    assert {c.strips for c in checked} == {1, 2} and {c.decode for c in checked} == set(configs.DECODES)
    assert any(c.fixup for c in checked) and {c.stages for c in checked} >= {2, 3}


def test_rezero_is_a_launch_option_of_both_formats():
    # The finalize launch re-zeroes a kept workspace instead of a memset per product: the main
    # kernels are unchanged (same defines, same cache keys), the finalize build is prebuilt too.
    for fmt, base in (("bitmap", LaunchConfig(nrows=16)), ("tiled_csl", LaunchConfig(nrows=16, words_per_stage=2048))):
        on = replace(base, rezero=True).validate(fmt)
        assert on.defines(fmt) == base.defines(fmt) and on.smem_bytes(fmt) == base.smem_bytes(fmt)
        assert configs.unvalidated_options(on) == (["rezero"] if "rezero" in configs.UNVALIDATED else [])
        assert configs.parse_options(fmt, ["rezero"]) == {"rezero": True}
        assert any(c.rezero for c in configs.candidates(fmt, 16, 0.8, unvalidated=True))
        with pytest.raises(ValueError, match="rezero and fixup are two ways"):
            replace(on, fixup=True).validate(fmt)
    assert ("splitk_finalize.cu", "flashllm_splitk_finalize", {"FLASHLLM_REZERO": 1}) in launch.build_jobs()


def test_stream_k_launch_geometry():
    assert configs.persistent_blocks(20, 792, 1) == 20  # never more blocks than tiles
    assert configs.persistent_blocks(11008, 792, 1) == 792 and configs.persistent_blocks(11008, 792, 2) == 396
    assert configs.persistent_blocks(5, 3, 4) == 1  # more activation chunks than slots: one block each
    assert [len(r) for r in configs.persistent_ranges(10, 4)] == [2, 3, 2, 3]
    cfg = LaunchConfig(nrows=16, persistent=True).validate("bitmap")
    assert cfg.defines("bitmap")["FLASHLLM_PERSISTENT"] == 1
    assert "FLASHLLM_PERSISTENT" not in LaunchConfig(nrows=16).defines("bitmap")  # the old cache keys
    assert configs.unvalidated_options(cfg) == (["persistent"] if "persistent" in configs.UNVALIDATED else [])
    for bad, fmt in ((dict(strips=2), "bitmap"), ({}, "tiled_csl")):
        with pytest.raises(ValueError, match="persistent blocks are a bitmap option"):
            replace(LaunchConfig(nrows=16, words_per_stage=2048), persistent=True, **bad).validate(fmt)
    # Stream-K blocks ending split-K themselves: the fixup's defines, and 16 bytes for their own flag.
    ended = replace(cfg, fixup=True).validate("bitmap")
    assert ended.defines("bitmap") == {**cfg.defines("bitmap"), "FLASHLLM_FIXUP": 1,
                                       "FLASHLLM_SMEM_BYTES": cfg.smem_bytes("bitmap") + 16}
    tuning = configs.tuning_candidates("bitmap", 16, 0.8, k_tiles=64, unvalidated=True)
    assert {c.split_k for c in tuning if c.persistent} == {0} and any(c.persistent for c in tuning)
    assert any(c.persistent and c.fixup for c in tuning)
    checked = [c for fmt, c in configs.checked_variants() if c.persistent]
    assert any(not c.fixup for c in checked) and {c.nrows for c in checked if c.fixup} >= {8, 16, 128}


def test_stream_k_strips_are_completed_by_exactly_one_block():
    # With fixup, the block whose added tiles bring a strip's count to K tiles rounds it: in any
    # order the blocks arrive, exactly one does, since the blocks' counts for a strip sum to K tiles.
    import itertools
    import random

    for strips, k_tiles, blocks in ((3, 5, 4), (1, 7, 7), (4, 64, 11), (10, 3, 30)):
        ranges = configs.persistent_ranges(strips * k_tiles, min(blocks, strips * k_tiles))
        arrivals = [(s, sum(1 for f in r if f // k_tiles == s)) for r in ranges for s in {f // k_tiles for f in r}]
        for order in itertools.islice((random.Random(seed).sample(arrivals, len(arrivals)) for seed in range(20)), 20):
            count = [0] * strips
            finishers = [0] * strips
            for strip, amount in order:
                finishers[strip] += count[strip] == k_tiles - amount  # fixup_tile's `last`
                count[strip] += amount
            assert finishers == [1] * strips and count == [k_tiles] * strips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,sparsity,plan", [
    (200, 300, 19, 0.8, E.Plan(nrows=32, split_k=1, words_per_stage=2048)),
    (200, 300, 19, 0.5, E.Plan(nrows=8, split_k=3, words_per_stage=256)),
    (130, 70, 1, 0.95, E.Plan(nrows=8, split_k=1, words_per_stage=1536)),
    (129, 129, 40, 0.0, E.Plan(nrows=16, split_k=2, words_per_stage=256)),
    (64, 64, 5, 1.0, E.Plan(nrows=8, split_k=1)),
    (257, 100, 70, 0.8, E.Plan(nrows=64, split_k=1, words_per_stage=3072)),
    # 8 rows: one A load serves two k16 steps, folded in the epilogue (4 warps above), except with 8
    # warps and one dense tile
    (200, 300, 7, 0.8, E.Plan(nrows=8, split_k=3, words_per_stage=256, warps=8)),
    (130, 70, 1, 0.95, E.Plan(nrows=8, split_k=1, words_per_stage=1536, warps=8)),
    (129, 129, 9, 0.5, E.Plan(nrows=8, split_k=1, words_per_stage=2048, warps=8)),
    (129, 129, 9, 0.5, E.Plan(nrows=8, split_k=2, words_per_stage=2048, warps=8, dense_tiles=1)),
])
def test_tiled_csl_kernel_emulated(dtype, m, k, n, sparsity, plan, gen):
    w = pruned(m, k, sparsity, dtype, gen)
    x = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(m, generator=gen).to(dtype) if n % 2 else None
    y, writes = E.tiled_csl_kernel(x, TiledCSLWeight.from_dense(w), bias, plan)
    _reference_check(y, writes, x, w, bias, len(E.split_ranges(-(-k // 64), plan.split_k)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", ((1, 1), (15, 63), (17, 65), (33, 130), (300, 70)))
@pytest.mark.parametrize("words_per_stage", (64, 320, 1024))
def test_tiled_csl16_lanes_decode_exactly(dtype, sparsity, shape, words_per_stage, gen):
    # 64 words per stage sends every tile denser than 94% sparsity down the over-full path (the rest
    # of its run scattered from global memory); 1024 holds any tile.
    w = TiledCSL16Weight.from_dense(pruned(*shape, sparsity, dtype, gen))
    decoded = E.tiled_csl16_decoded(w, words_per_stage)
    assert torch.equal(decoded, E.float_bits(w.to_dense())), f"seed {gen.initial_seed()}"


def test_tiled_csl16_lane_reads_its_own_b_fragments():
    # The fragment order, spelt out for one tile: lane 4 g + t's 16 bytes at 1024 h + 512 q + 16 lane
    # are (b0, b1) of k16 steps 2q and 2q + 1 for weight row 8 h + g, i.e. columns 16 kc + 2t (+1)
    # and 16 kc + 2t + 8 (+9): what mma.m16n8k16 reads as B (k = column, n = row).
    w = torch.arange(1, 1025, dtype=torch.float32).reshape(16, 64)  # every value distinct (and exact in fp16)
    frags = E.tiled_csl16_b_fragments(TiledCSL16Weight.from_dense(w.half()))[0]  # (h, q, lane, 4)
    value = E.float_bits(w.half())
    for h in range(2):
        for q in range(2):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for r in range(4):
                    kc, dk = 2 * q + r // 2, 8 * (r % 2)
                    col = 16 * kc + dk + 2 * t
                    expected = int(value[8 * h + g, col]) | int(value[8 * h + g, col + 1]) << 16
                    assert int(frags[h, q, lane, r]) == expected, (h, q, lane, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,sparsity,plan", [
    (200, 300, 19, 0.8, E.Plan(nrows=32, split_k=1, words_per_stage=320)),
    (200, 300, 19, 0.5, E.Plan(nrows=8, split_k=3, words_per_stage=64)),  # over-full tiles everywhere
    (130, 70, 1, 0.95, E.Plan(nrows=8, split_k=1, words_per_stage=192)),
    (129, 129, 40, 0.0, E.Plan(nrows=16, split_k=2, words_per_stage=512)),
    (64, 64, 5, 1.0, E.Plan(nrows=8, split_k=1, words_per_stage=256)),
    (257, 100, 70, 0.8, E.Plan(nrows=64, split_k=1, words_per_stage=1024)),
    (33, 1000, 9, 0.8, E.Plan(nrows=8, split_k=2, words_per_stage=320)),  # 8 activation tiles per chunk, 16 tiles
])
def test_tiled_csl16_kernel_emulated(dtype, m, k, n, sparsity, plan, gen):
    w = pruned(m, k, sparsity, dtype, gen)
    x = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(m, generator=gen).to(dtype) if n % 2 else None
    y, writes = E.tiled_csl16_kernel(x, TiledCSL16Weight.from_dense(w), bias, plan)
    _reference_check(y, writes, x, w, bias, len(E.split_ranges(-(-k // 64), plan.split_k)))


@pytest.mark.parametrize("stages", [2, 3, 4, 6])
@pytest.mark.parametrize("nk", [1, 2, 3, 5, 16, 17, 61])
def test_tiled_csl16_bulk_copies_wait_for_their_own_phase(stages, nk):
    # FLASHLLM_BULK: stage st's mbarrier completes one phase per use (lane 0's arrival with the bytes,
    # then the bulk copy's bytes; an empty tile completes it at once); tile i waits for phase
    # parity (i / STAGES) & 1 of stage i % STAGES. Replayed with copies landing at any time: every
    # wait must find the phase that carried tile i completed and no later one started (try_wait.parity
    # cannot tell phase k from k + 2), so it neither hangs nor reads another tile's words.
    completed = [0] * stages  # phases completed per stage's barrier
    carried: list[list[int]] = [[] for _ in range(stages)]
    for p in range(min(stages - 1, nk)):  # the prologue's copies land (at the latest) before tile 0's wait
        completed[p] += 1
        carried[p].append(p)
    for i in range(nk):
        st, parity = i % stages, (i // stages) & 1
        assert completed[st] >= 1 and (completed[st] - 1) % 2 == parity and carried[st][-1] == i, (i, completed)
        j = i + stages - 1  # issued after the wait: into the stage tile i - 1 freed
        if j < nk:
            assert j % stages == (i - 1) % stages
            completed[j % stages] += 1
            carried[j % stages].append(j)


@pytest.mark.parametrize("stages", [2, 3, 4, 6])
@pytest.mark.parametrize("nrows,x_rows", [(8, 128), (16, 128), (32, 128), (64, 128), (8, 64), (64, 64)])
@pytest.mark.parametrize("nk", [1, 2, 3, 5, 16, 17, 33, 61])
def test_tiled_csl16_pipeline_waits_for_what_it_reads(stages, nrows, x_rows, nk):
    # tiled_csl16_spmm.cu's loop control replayed: the cp.async groups a thread commits (the first
    # activation chunk, then one per tile copy, empty past the split, and a chunk's own group at each
    # later chunk start), the waits, and the run-bound windows. At tile i the wait must leave tile i's
    # copy and its activation chunk complete, and every shuffle must read inside the current window.
    xt = x_rows // nrows  # FLASHLLM_XROWS
    groups = ["x0"] + [f"w{p}" if p < nk else "empty" for p in range(stages - 1)]
    done = 0  # groups completed, oldest first
    window = 0
    for i in range(nk):
        if i > 0 and i % xt == 0:
            groups.append(f"x{i // xt}")
            done = len(groups)  # cp_async_wait<0>
        else:
            done = max(done, len(groups) - (stages - 2))  # cp_async_wait<STAGES - 2>
        assert f"w{i}" in groups[:done] and f"x{i // xt}" in groups[:done], (i, groups, done)
        if i > 0 and i % 16 == 0:
            window = i
        j = i + stages - 1
        for t in (i, j):  # lo_of(t), hi_of(t): lanes t - window and t + 1 - window
            assert 0 <= t - window and t + 1 - window < 32, (i, t, window)
        groups.append(f"w{j}" if j < nk else "empty")
        assert (j % stages) == ((i - 1) % stages)  # the stage tile i - 1 was read from


def test_tiled_csl_core_words_find_their_row_and_activation():
    # Every location of a tile, the sentinel and a corrupt slot: the CUDA-core path's row (the slot
    # rounded down to 128 bytes, masked to the tile) and activation (byte slot & 0x3fe of the 8
    # swizzled row copies) must be the location's own row and column.
    from flashllm.formats.tiled_csl import slot_of

    loc = torch.arange(8192)
    row = torch.arange(64) + 1  # column c's activation: the float16 bits c + 1 (tiny subnormals, all distinct)
    words = torch.cat([slot_of(loc) << 16 | 0x3C00, torch.tensor([(2 * 8192) << 16, 65534 << 16 | 0x3C00])])
    rows, terms = E.tiled_csl_core_terms(words, E.row_copies(row), torch.float16)
    expected_x = (row[loc % 64]).to(torch.int16).view(torch.float16).to(torch.float32)  # value 1.0 (0x3c00)
    assert torch.equal(rows[:8192], loc // 64) and torch.equal(terms[:8192], expected_x)
    assert rows[8192:].tolist() == [0, 127] and terms[8192] == 0  # the sentinel adds its zero to row 0
    # the stager: thread t copies chunk t of the copies from the row's chunk (t % 8) ^ (t / 8)
    copies = E.row_copies(row)
    for t in range(64):
        src = ((t & 7) ^ ((t >> 3) & 7)) * 8
        assert torch.equal(copies[8 * t : 8 * t + 8], row[src : src + 8])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,sparsity,split_k", [
    (200, 300, 0.8, 1), (200, 300, 0.5, 3), (130, 70, 0.95, 1), (129, 129, 0.0, 2), (64, 64, 1.0, 1),
    (300, 1000, 0.9, 4),
])
def test_tiled_csl_cuda_core_path_emulated(dtype, m, k, sparsity, split_k, gen):
    w = pruned(m, k, sparsity, dtype, gen)
    x = torch.randn(1, k, generator=gen).to(dtype)
    bias = torch.randn(m, generator=gen).to(dtype) if split_k % 2 else None
    plan = E.Plan(nrows=8, split_k=split_k, cores=1)
    y, writes = E.tiled_csl_kernel(x, TiledCSLWeight.from_dense(w), bias, plan)
    _reference_check(y, writes, x, w, bias, len(E.split_ranges(-(-k // 64), split_k)))
    with pytest.raises(ValueError, match="one activation row"):
        E.tiled_csl_kernel(torch.cat([x, x]), TiledCSLWeight.from_dense(w), bias, plan)


def test_cuda_cores_are_a_tiled_csl_compile_option(monkeypatch):
    on = LaunchConfig(nrows=8, words_per_stage=2048, cores=1).validate("tiled_csl")
    warp = replace(on, cores=2).validate("tiled_csl")
    off = LaunchConfig(nrows=8, words_per_stage=2048)
    # no dense tiles; the per-lane sums (128 rows x 32 lanes of fp32; one per warp with cores=2) after
    # the run bounds, 16-byte aligned
    plain = off.smem_bytes("tiled_csl") - 2 * (8192 + 8) * 2 - 3 * 8 + 32
    assert on.smem_bytes("tiled_csl") == plain + 128 * 128 and warp.smem_bytes("tiled_csl") == plain + 4 * 128 * 128
    for cfg in (on, warp):
        assert cfg.defines("tiled_csl") == {**off.defines("tiled_csl"), "FLASHLLM_CORES": cfg.cores,
                                            "FLASHLLM_SMEM_BYTES": cfg.smem_bytes("tiled_csl")}
    assert replace(on, stages=2).validate("tiled_csl").stages == 2  # no tile scattered ahead: 2 stages suffice
    assert configs.unvalidated_options(on) == (["cores"] if "cores" in configs.UNVALIDATED else [])
    assert configs.unvalidated_options(warp) == (["cores_warp"] if "cores_warp" in configs.UNVALIDATED else [])
    assert configs.parse_options("tiled_csl", ["cores"]) == {"cores": 1}
    assert configs.parse_options("tiled_csl", ["cores_warp", "stages6"]) == {"cores": 2, "stages": 6}
    # forced on any launch it brings its geometry; refused where it cannot run
    forced = configs.with_options(LaunchConfig(nrows=32, words_per_stage=1024, warps=8, dense_tiles=1),
                                  {"cores": 1}, "tiled_csl")
    assert (forced.nrows, forced.warps, forced.dense_tiles, forced.words_per_stage) == (8, 4, 2, 1024)
    for bad, why in ((dict(nrows=16), "runs nrows=8, 4 warps"), (dict(warps=8), "runs nrows=8, 4 warps"),
                     (dict(dense_tiles=1), "no dense tile"), (dict(cores=3), "cores must be one of")):
        with pytest.raises(ValueError, match=why):
            replace(on, **bad).validate("tiled_csl")
    with pytest.raises(ValueError, match="cores. is a Tiled-CSL option"):
        LaunchConfig(nrows=8, cores=1).validate("bitmap")
    # tuning offers both at N = 1 only; the checked variants cover their code shapes
    offered = {c.cores for c in configs.candidates("tiled_csl", 1, 0.9, unvalidated=True)}
    assert offered == {0, 1, 2}
    assert not any(c.cores for c in configs.candidates("tiled_csl", 16, 0.9, unvalidated=True))
    assert not any(c.cores for c in configs.candidates("tiled_csl", 1, 0.9)) or "cores" not in configs.UNVALIDATED
    checked = [c for f, c in configs.checked_variants() if c.cores]
    assert {c.cores for c in checked} == {1, 2} and all(any(c.fixup for c in checked if c.cores == s) for s in (1, 2))
    assert any(c.prefetch for c in checked) and {c.stages for c in checked} >= {2, 4, 6}
    assert {c.words_per_stage for c in checked} >= {1024, 4096}
    # forced for a whole model: one-row products take it, the others keep their launch
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "tiled_csl:cores")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert configs.get_config("sm_90", "tiled_csl", 4096, 4096, 1, 0.9).cores
        wide = configs.get_config("sm_90", "tiled_csl", 4096, 4096, 16, 0.9)
    assert not wide.cores and wide.nrows == 16


def test_the_launcher_refuses_cuda_cores_for_more_than_one_row():
    cfg = LaunchConfig(nrows=8, words_per_stage=2048, cores=1)
    with pytest.raises(ValueError, match="multiplies one activation row, got 2"):
        tiled_csl_cuda.KERNEL.plan(2, torch.float16, torch.device("cpu"), [], 256, 256, cfg)


# --- Tiled-CSL through Hopper's warpgroup MMA (FLASHLLM_WGMMA) ---------------------------------------
def test_sw128_addressing_is_the_dense_tiles_swizzle():
    # The tensor cores' 128-byte swizzle, sliced 32 bytes per k16 step into a 1024-byte group, reads
    # chunk 2 kc + k / 8 of row r where the Tiled-CSL tile stores it (chunk ^ r % 8), and a k16
    # slice of 8 rows touches all 32 banks (conflict-free) for each of its two chunks.
    from flashllm.formats.tiled_csl import slot_of

    for kc in range(4):
        addr = E.sw128_addresses(kc * 32, 64)  # rows 0-63, k 16 kc ..
        loc = torch.arange(64)[:, None] * 64 + kc * 16 + torch.arange(16)[None, :]
        assert torch.equal(addr, slot_of(loc))
        for chunk in (0, 8):
            banks = {int(a) // 4 % 32 for a in addr[:8, chunk : chunk + 8].reshape(-1)}
            assert len(banks) == 32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", ((1, 1), (127, 63), (129, 130), (300, 70)))
@pytest.mark.parametrize("words_per_stage", (256, 2048))
def test_tiled_csl_wgmma_operands_decode_exactly(dtype, sparsity, shape, words_per_stage, gen):
    w = TiledCSLWeight.from_dense(pruned(*shape, sparsity, dtype, gen))
    decoded = E.tiled_csl_wgmma_decoded(w, words_per_stage)
    assert torch.equal(decoded.view(torch.int16), w.to_dense().view(torch.int16)), f"seed {gen.initial_seed()}"


@pytest.mark.parametrize("nrows", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("n0,n", [(0, 1), (0, 200), (64, 69)])
def test_swizzled_activation_stage_is_what_the_tensor_cores_read(nrows, n0, n, gen):
    # XStagerT<true>: every chunk copied once by one thread (common.cuh's pass arithmetic), and the
    # wgmma B operand of each k16 step, read through the swizzle, is the activation tile (zeros past
    # N and past the valid columns).
    threads, chunks = 128, nrows * 8
    rows_per_pass, passes = threads // 8, max(1, chunks // threads)
    placed = {}
    for t in range(threads):
        if chunks < threads and t >= chunks:
            continue
        r0, c = t >> 3, t & 7
        for p in range(passes):
            row = r0 + p * rows_per_pass
            byte = r0 * 128 + ((c ^ (r0 & 7)) << 4) + p * rows_per_pass * 128
            assert byte == row * 128 + ((c ^ (row & 7)) << 4) and (row, c) not in placed
            placed[(row, c)] = byte
    assert sorted(placed) == [(r, c) for r in range(nrows) for c in range(8)]
    x = torch.randn(n, 150, generator=gen).to(torch.float16)
    xp, kx = E.padded_activations(x, 150)
    for k0 in (0, 128):
        xs = E.stage_x_sw128(xp, nrows, n0, k0, kx)
        for (row, c), byte in placed.items():  # the emulated stage is the stager's placement
            assert torch.equal(xs[byte // 2 : byte // 2 + 8], E.stage_x(xp, nrows, n0, k0, kx)[row, 8 * c : 8 * c + 8])
        want = torch.zeros(nrows, 64, dtype=torch.float64)
        rows, cols = max(0, min(nrows, n - n0)), min(64, kx - k0)
        want[:rows, :cols] = xp[n0 : n0 + rows, k0 : k0 + cols].double()
        for kc in range(4):
            got = E.halves_to_float(E.wgmma_operand(xs, kc * 32, nrows), torch.float16)
            assert torch.equal(got, want[:, 16 * kc : 16 * kc + 16])


@pytest.mark.parametrize("nrows", [8, 16, 32, 64, 128])
def test_wgmma_epilogue_stores_every_accumulator_once_in_pairs(nrows):
    # The documented D layout gives each (row, column) of a 64 x N half to exactly one register, and
    # store_half's shuffle with lane ^ 4 stores each one at its own (n, m), the even row of a pair
    # by the lane holding it at column n, the odd one by its partner at column n + 1.
    row, col = E.wgmma_d_layout(nrows)
    assert sorted(zip(row.reshape(-1).tolist(), col.reshape(-1).tolist())) == [
        (r, c) for r in range(64) for c in range(nrows)]
    d = (row * 1000 + col).double()  # each register holds its own coordinates
    seen = {}
    for vals, nn, m, live in E.store_half_targets(d, 0, 0, 64, nrows):
        assert bool(live.all())
        for v, n_, m_ in zip(vals.tolist(), nn.tolist(), m.tolist()):
            assert v == m_ * 1000 + n_ and (n_, m_) not in seen
            seen[(n_, m_)] = True
    assert len(seen) == 64 * nrows


_WGMMA_CASES = [
    (200, 300, 17, 0.8, E.Plan(nrows=16, split_k=1, wgmma=True)),
    (200, 300, 5, 0.5, E.Plan(nrows=8, split_k=3, wgmma=True)),
    (130, 70, 1, 0.95, E.Plan(nrows=8, split_k=1, words_per_stage=256, wgmma=True)),
    (129, 129, 40, 0.0, E.Plan(nrows=32, split_k=2, wgmma=True)),
    (64, 64, 5, 1.0, E.Plan(nrows=8, split_k=1, wgmma=True)),
    (257, 100, 70, 0.8, E.Plan(nrows=64, split_k=1, words_per_stage=3072, wgmma=True)),
    (130, 200, 131, 0.7, E.Plan(nrows=128, split_k=2, wgmma=True)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,m,k,n,sparsity,plan", [
    (fmt, *case) for case in _WGMMA_CASES for fmt in ("bitmap", "tiled_csl")
    if fmt == "bitmap" or case[-1].nrows <= 64  # Tiled-CSL blocks take up to 64 activation rows
])
def test_wgmma_kernels_emulated(fmt, dtype, m, k, n, sparsity, plan, gen):
    # Both kernels: Tiled-CSL's A from the scattered dense tiles through the swizzle, the bitmap
    # kernel's A from its decoded registers (one 64-row strip per block), B from the swizzled stage.
    w = pruned(m, k, sparsity, dtype, gen)
    x = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(m, generator=gen).to(dtype) if n % 2 else None
    if fmt == "bitmap":
        y, writes = E.bitmap_kernel(x, BitmapWeight.from_dense(w), bias, plan)
    else:
        y, writes = E.tiled_csl_kernel(x, TiledCSLWeight.from_dense(w), bias, plan)
    _reference_check(y, writes, x, w, bias, len(E.split_ranges(-(-k // 64), plan.split_k)))


def test_bitmap_wgmma_a_registers_are_the_decoded_blocks(gen):
    # a0..a3 of warp w, step kc: rows 16 w + (0-7, 8-15) x k 16 kc + (0-7, 8-15), as mma.m16n8k16's
    # A layout places them, so the four warps' registers are the strip's 64 x 16 slice bit for bit.
    w = BitmapWeight.from_dense(pruned(130, 190, 0.6, torch.float16, gen))
    regs = E.bitmap_wgmma_a(w)  # (tiles, kc, warp, 32, 4)
    got = E.a_matrix(regs, torch.float16)  # (tiles, kc, warp, 16, 16)
    dense = F.pad(w.to_dense().double(), (0, 192 - 190, 0, 192 - 130))
    for t in range(regs.shape[0]):
        strip, kt = divmod(t, 3)
        for kc in range(4):
            want = dense[64 * strip : 64 * strip + 64, 64 * kt + 16 * kc : 64 * kt + 16 * kc + 16]
            assert torch.equal(got[t, kc].reshape(64, 16), want)


def forcing_works_on_sm90_only(monkeypatch, option: str, launches, refused_format: str, refusal: str) -> None:
    """FLASHLLM_KERNEL_OPTIONS=`option` (a LaunchConfig flag of that name) applies to each (format, N,
    sparsity) of `launches` on an sm_90 GPU, and is refused on an sm_80 one with a message matching
    `refusal`."""
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, option)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a pending option warns when forced)
        for fmt, n, sparsity in launches:
            assert getattr(configs.get_config("sm90", fmt, 4096, 4096, n, sparsity), option), (fmt, n)
        with pytest.raises(ValueError, match=refusal):
            configs.get_config("sm80", refused_format, 4096, 4096, 16, 0.8)


def test_wgmma_is_a_tiled_csl_compile_option(monkeypatch):
    on = LaunchConfig(nrows=16, words_per_stage=2048, wgmma=True).validate("tiled_csl")
    off = LaunchConfig(nrows=16, words_per_stage=2048)
    # 1024 bytes of slack, two dense tiles padded to 17 KB, unpadded 128-byte activation rows
    assert on.smem_bytes("tiled_csl") == 1024 + 2 * 17 * 1024 + 3 * (2048 * 4 + 16 * 128) + 3 * 8
    assert on.defines("tiled_csl") == {**off.defines("tiled_csl"), "FLASHLLM_WGMMA": 1,
                                       "FLASHLLM_SMEM_BYTES": on.smem_bytes("tiled_csl")}
    assert configs.unvalidated_options(on) == (["wgmma"] if "wgmma" in configs.UNVALIDATED else [])
    assert configs.parse_options("tiled_csl", ["wgmma", "stages4"]) == {"wgmma": True, "stages": 4}
    for bad in (dict(warps=8), dict(dense_tiles=1, stages=2), dict(prefetch=4)):
        with pytest.raises(ValueError, match="wgmma"):
            replace(on, **bad).validate("tiled_csl")
    # the bitmap kernel: one strip, the fragment decode, the plain pipeline; a stage begins with its
    # 128-byte activation rows and is padded to 1024 bytes
    bm = LaunchConfig(nrows=16, value_cap=1536, wgmma=True).validate("bitmap")
    assert bm.smem_bytes("bitmap") == 1024 + 3 * 6144 + 4 * 32 * 8  # 16 x 128 + 512 + (1536 + 8) x 2 -> 6144
    assert bm.defines("bitmap")["FLASHLLM_WGMMA"] == 1
    assert replace(bm, nrows=128).validate("bitmap").wgmma  # m64n128k16: prefill at batch 1
    for bad in (dict(strips=2), dict(decode="scatter"), dict(persistent=True), dict(offset_ring=True),
                dict(bulk_copy=True), dict(tiles_per_stage=2), dict(prefetch=4)):
        with pytest.raises(ValueError, match="wgmma"):
            replace(bm, **bad).validate("bitmap")
    forced_bm = configs.with_options(LaunchConfig(nrows=32, strips=2, decode="scatter", persistent=False),
                                     {"wgmma": True}, "bitmap")
    assert (forced_bm.strips, forced_bm.decode, forced_bm.wgmma) == (1, "fragment", True)
    # forced on any launch it brings its geometry: one warpgroup, two dense tiles, no prefetch
    forced = configs.with_options(LaunchConfig(nrows=32, stages=2, words_per_stage=1024, warps=8, dense_tiles=1,
                                               prefetch=4), {"wgmma": True}, "tiled_csl")
    assert (forced.warps, forced.dense_tiles, forced.prefetch, forced.stages, forced.wgmma) == (4, 2, 0, 3, True)
    # sm_90 only: built for sm_90a, refused elsewhere, and forcing it on another GPU says so
    assert "--gpu-architecture=sm_90a" in launch.compile_options("sm_90", on.defines("tiled_csl"), torch.float16)
    assert launch.builds_for("sm_90", on.defines("tiled_csl")) and not launch.builds_for("sm_80", on.defines("tiled_csl"))
    assert launch.builds_for("sm_80", off.defines("tiled_csl"))
    with pytest.raises(launch.KernelUnavailable, match="sm_90 GPUs"):
        launch.compile_options("sm_80", on.defines("tiled_csl"), torch.float16)
    forcing_works_on_sm90_only(monkeypatch, "wgmma", [("tiled_csl", 16, 0.8), ("bitmap", 128, 0.8)], "tiled_csl",
                               "sm_90 GPUs")
    # tuning offers it (where validated) at every N up to 64; the checked variants cover its N shapes
    assert any(c.wgmma for c in configs.candidates("tiled_csl", 8, 0.8, unvalidated=True))
    assert not any(c.wgmma for c in configs.candidates("tiled_csl", 8, 0.8)) or "wgmma" not in configs.UNVALIDATED
    for fmt, rows in (("bitmap", {8, 16, 32, 64, 128}), ("tiled_csl", {8, 16, 32, 64})):
        checked = [c for f, c in configs.checked_variants() if c.wgmma and f == fmt]
        assert {c.nrows for c in checked} == rows and any(c.fixup for c in checked)
    assert any(c.wgmma and c.value_cap for f, c in configs.checked_variants() if f == "bitmap")


@pytest.mark.parametrize("warps", configs.CSL_WARPS)
def test_tiled_csl_warps_own_every_row_once(warps):
    # tiled_csl_spmm.cu with WARPS warps: warp w reads rows WARP_ROWS w + 16 h + (q / 2) 8 + lane % 8
    # of k-chunk half q % 2 (h < HALVES, q = lane / 8) with ldmatrix, and stores accumulator
    # mt = 2 h + j (8-row group j of half h) at m8 = WARP_ROWS w + 8 mt.
    warp_rows, halves = 128 // warps, 128 // warps // 16
    owner = {}
    for w in range(warps):
        for h in range(halves):
            for lane in range(32):
                q = lane >> 3
                key = (w * warp_rows + h * 16 + (q >> 1) * 8 + (lane & 7), q & 1)
                assert key not in owner, key
                owner[key] = (w, h)
    assert sorted(owner) == [(r, c) for r in range(128) for c in (0, 1)]
    for (row, _), (w, h) in owner.items():
        j = (row - w * warp_rows - 16 * h) // 8
        m8 = w * warp_rows + 8 * (2 * h + j)
        assert m8 <= row < m8 + 8  # the accumulator holding a row is stored at that row
    stored = sorted(w * warp_rows + 8 * mt for w in range(warps) for mt in range(2 * halves))
    assert stored == list(range(0, 128, 8))


@pytest.mark.parametrize("nrows", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("threads", [128, 256])
@pytest.mark.parametrize("n0,n", [(0, 1), (0, 200), (64, 69)])
def test_activation_stager_copies_every_chunk_once(nrows, threads, n0, n):
    # common.cuh XStager: thread t copies column chunk t % 8 of rows t / 8 + (threads / 8) p for
    # p < PASSES, reading only rows < N (the rest zero-filled), when it has chunks (t < NROWS * 8).
    chunks = nrows * 8
    rows_per_pass, passes = threads // 8, max(1, chunks // threads)
    copied = {}
    for t in range(threads):
        if chunks < threads and t >= chunks:
            continue
        r0, col = t >> 3, (t & 7) * 8
        dst = (r0 * E.XS_STRIDE + col) * 2
        for p in range(passes):
            row = r0 + p * rows_per_pass
            byte = dst + p * rows_per_pass * E.XS_STRIDE * 2
            assert byte == (row * E.XS_STRIDE + col) * 2 and byte + 16 <= nrows * E.XS_STRIDE * 2
            live = n0 + r0 + p * rows_per_pass < n
            assert live == (n0 + row < n)
            assert (row, col) not in copied
            copied[(row, col)] = live
    assert sorted(copied) == [(r, c) for r in range(nrows) for c in range(0, 64, 8)]


@pytest.mark.parametrize("decode", configs.DECODES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_bitmap_fitted_buffers_decode_exactly(gen, decode, sparsity):
    # The buffer FIT chooses from the longest run holds every read of both decodes (a read past
    # it would fail the gather), whatever stale bytes follow the runs; a shorter one is refused.
    w = BitmapWeight.from_dense(pruned(130, 190, sparsity, torch.float16, gen))
    longest = int((w.offsets[1:] - w.offsets[:-1]).max())
    cap = LaunchConfig(nrows=16, value_cap=configs.FIT).fitted(longest).value_cap or 4096
    assert longest <= cap
    decoded = E.bitmap_decoded(w, stale=None, decode=decode, value_cap=cap)
    assert torch.equal(decoded.view(torch.int16), w.to_dense().view(torch.int16))
    if longest > configs.VALUE_CAPS[0]:
        with pytest.raises(RuntimeError, match="does not fit"):
            E.bitmap_decoded(w, decode=decode, value_cap=max(c for c in configs.VALUE_CAPS if c < longest))


def test_bitmap_emulation_catches_a_layout_bug(gen, monkeypatch):
    # A lane mapping off by one (the bits of lane l+1) must be detected: the emulation is a test.
    w = BitmapWeight.from_dense(pruned(64, 64, 0.5, torch.float16, gen))
    monkeypatch.setattr(E, "_LANE", (torch.arange(32) + 1) % 32)
    assert not torch.equal(E.bitmap_decoded(w).view(torch.int16), w.to_dense().view(torch.int16))


@pytest.mark.parametrize("k_tiles,split", [(1, 1), (1, 5), (7, 3), (10, 4), (64, 16), (5, 0)])
def test_split_partition_covers_every_tile_once(k_tiles, split):
    ranges = E.split_ranges(k_tiles, split)
    assert sorted(t for r in ranges for t in r) == list(range(k_tiles))
    assert all(len(r) > 0 for r in ranges)
    blocks, per = launch.split_plan(k_tiles, split)
    assert blocks == len(ranges) and all(r.start == i * per for i, r in enumerate(ranges))


# --- launch configurations ---------------------------------------------------------------------------
def test_every_table_entry_is_valid_and_fits_hopper():
    for (_, fmt, _, nb, _), cfg in configs.TUNED.items():
        cfg.validate(fmt)
        assert cfg.smem_bytes(fmt) <= 227 * 1024, (fmt, cfg)
        assert cfg.nrows >= min(nb, 64 if fmt == "tiled_csl" else 128) or cfg.nrows == 8
    for fmt, cfg in configs.checked_variants():
        assert cfg.smem_bytes(fmt) <= 227 * 1024
    # the scatter decode trades the 4 KB fragment table for a 8 KB dense tile per strip
    base = LaunchConfig(nrows=16)
    assert base.smem_bytes("bitmap") + 8192 - 1024 == LaunchConfig(nrows=16, decode="scatter").smem_bytes("bitmap")
    assert LaunchConfig(nrows=16, decode="scatter").defines("bitmap")["FLASHLLM_DECODE"] == 1
    assert {cfg.decode for fmt, cfg in configs.checked_variants() if fmt == "bitmap"} == set(configs.DECODES)
    assert {cfg.warps for fmt, cfg in configs.checked_variants() if fmt == "tiled_csl"} == set(configs.CSL_WARPS)
    assert all(cfg.validated() for _, cfg in configs.shipped_variants())  # nothing unvalidated ships
    # 8 warps: the same shared memory, twice the threads; 4-warp variants keep their compile keys
    eight = LaunchConfig(nrows=16, words_per_stage=2048, warps=8)
    assert eight.smem_bytes("tiled_csl") == replace(eight, warps=4).smem_bytes("tiled_csl") and eight.threads == 256
    assert eight.defines("tiled_csl")["FLASHLLM_WARPS"] == 8
    assert "FLASHLLM_WARPS" not in replace(eight, warps=4).defines("tiled_csl")


@pytest.mark.parametrize("fmt", ("bitmap", "tiled_csl", "tiled_csl16"))
def test_get_config_covers_every_bucket(fmt, monkeypatch):
    monkeypatch.setattr(configs, "_warned_missing", set())
    for arch in ("sm90", "sm80"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for n in (1, 2, 7, 8, 9, 16, 31, 33, 64, 100, 128, 200, 256, 1000):
                for s in (0.0, 0.5, 0.65, 0.8, 0.9, 0.99):
                    cfg = configs.get_config(arch, fmt, 4096, 4096, n, s)
                    cfg.validate(fmt)
                    assert cfg.nrows >= min(n, 128 if fmt == "bitmap" else 64)
                    assert cfg.smem_bytes(fmt) <= 227 * 1024
        # the table covers Hopper; elsewhere one warning (not one per call) points at retuning
        assert len(caught) == (0 if arch == "sm90" and fmt != "tiled_csl16" else 1), [str(w.message) for w in caught]


def test_buckets_and_classes():
    assert [configs.n_bucket(n) for n in (1, 2, 8, 9, 64, 65, 300)] == [1, 8, 8, 16, 64, 128, 256]
    assert [configs.sparsity_band(s) for s in (0.0, 0.59, 0.6, 0.74, 0.8, 0.85, 1.0)] == ["50", "50", "70", "70", "80", "90", "90"]
    assert configs.shape_class(4096, 4096) == "m4k-k8k"
    assert configs.shape_class(57344, 8192) == "mbig-k8k"
    assert configs.shape_class(8192, 28672) == "m8k-kbig"


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="nrows"):
        LaunchConfig(nrows=12).validate("bitmap")
    with pytest.raises(ValueError, match="strips"):
        LaunchConfig(nrows=128, strips=2).validate("bitmap")
    with pytest.raises(ValueError, match="words_per_stage"):
        LaunchConfig(nrows=16, stages=3, words_per_stage=1000 + 2).validate("tiled_csl")
    with pytest.raises(ValueError, match="nrows <= 64"):
        LaunchConfig(nrows=128, stages=3, words_per_stage=2048).validate("tiled_csl")
    with pytest.raises(ValueError, match="decode must be one of"):
        LaunchConfig(nrows=16, decode="gather").validate("bitmap")
    with pytest.raises(ValueError, match="default decode"):
        LaunchConfig(nrows=16, words_per_stage=2048, decode="scatter").validate("tiled_csl")
    with pytest.raises(ValueError, match="4 warps"):
        LaunchConfig(nrows=16, warps=8).validate("bitmap")
    with pytest.raises(ValueError, match="warps must be one of"):
        LaunchConfig(nrows=16, words_per_stage=2048, warps=6).validate("tiled_csl")
    with pytest.raises(ValueError, match="dense_tiles must be one of"):
        LaunchConfig(nrows=16, words_per_stage=2048, dense_tiles=3).validate("tiled_csl")
    with pytest.raises(ValueError, match="Tiled-CSL option"):
        LaunchConfig(nrows=16, dense_tiles=1).validate("bitmap")
    with pytest.raises(ValueError, match="stages must be 3..6 with dense_tiles=2"):
        LaunchConfig(nrows=16, stages=2, words_per_stage=2048).validate("tiled_csl")
    # one dense tile: no tile scattered ahead, so 2 stages already pipeline, in 16 KB less
    one = LaunchConfig(nrows=16, stages=2, words_per_stage=2048, dense_tiles=1).validate("tiled_csl")
    two = LaunchConfig(nrows=16, stages=2 + 1, words_per_stage=2048)
    assert two.smem_bytes("tiled_csl") - one.smem_bytes("tiled_csl") == (8192 + 8) * 2 + 2048 * 4 + 16 * 144 + 8
    assert one.defines("tiled_csl")["FLASHLLM_DENSE_TILES"] == 1 and "FLASHLLM_DENSE_TILES" not in two.defines("tiled_csl")


def test_tiled_csl16_configs():
    base = configs.default_config("tiled_csl16", 8, 0.8)
    assert (base.nrows, base.warps, base.words_per_stage) == (8, 4, 320) and base.validated()
    # the kernel's layout: an 18 KB activation chunk (128 / NROWS tiles of NROWS 144-byte rows),
    # then per warp two 2 KB tiles (+ 16 bytes for the sentinel's slot) and its stages
    assert base.smem_bytes("tiled_csl16") == 128 * 144 + 4 * (2 * 2064 + 4 * 320 * 4)
    assert base.defines("tiled_csl16")["FLASHLLM_CAPW"] == 320 and "FLASHLLM_WARPS" not in base.defines("tiled_csl16")
    eight = replace(base, warps=8)
    assert eight.defines("tiled_csl16")["FLASHLLM_WARPS"] == 8 and eight.rows_per_block("tiled_csl16") == 128
    assert (eight.tile_rows_per_block("tiled_csl16"), base.tile_rows_per_block("tiled_csl")) == (8, 1)
    for bad, match in ((replace(base, words_per_stage=300), "multiple of 32"),
                       (replace(base, words_per_stage=2048), "multiple of 32 in 64..1024"),
                       (replace(base, fixup=True), "none of the prefetch"), (replace(base, pdl=True), "none of the"),
                       (replace(base, nrows=128), "nrows <= 64"), (replace(base, dense_tiles=1), "dense_tiles"),
                       (replace(base, stages=7), "stages must be 2..6"), (replace(base, cores=1), "Tiled-CSL option")):
        with pytest.raises(ValueError, match=match):
            bad.validate("tiled_csl16")
    # options named without a format go to the two kernels that share them, not to tiled_csl16
    assert configs.parse_options("tiled_csl16", ["warps8", "stages3"]) == {"warps": 8, "stages": 3}
    with pytest.raises(ValueError, match="none of the prefetch"):
        configs.parse_options("tiled_csl16", ["fixup"])


def test_forced_options_without_a_format_leave_tiled_csl16_alone(monkeypatch):
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "fixup,tiled_csl16:warps8")
    assert configs.forced_options("tiled_csl16") == {"warps": 8}
    assert configs.forced_options("bitmap") == {"fixup": True} == configs.forced_options("tiled_csl")
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "tiled_csl16:pdl")
    with pytest.raises(ValueError, match="none of the prefetch"):
        configs.forced_options("tiled_csl16")


def test_cuda_module_by_format_name():
    assert cuda_module("bitmap") is bitmap_cuda and cuda_module("tiled_csl") is tiled_csl_cuda
    assert cuda_module("tiled_csl16").KERNEL.tile == (16, 64)
    with pytest.raises(ValueError, match="no CUDA kernel for format 'csr'"):
        cuda_module("csr")


def test_auto_split_k():
    # few row blocks: split until the SM slots are filled four times over, at most 16 ways
    assert configs.auto_split_k(k_tiles=112, blocks_mn=112, slots=132 * 4, n=16, in_features=7168,
                                bytes_per_element=0.5) == 16
    assert configs.auto_split_k(k_tiles=112, blocks_mn=300, slots=132 * 4, n=16, in_features=7168,
                                bytes_per_element=0.5) == 8
    # but keep 4 tiles per split
    assert configs.auto_split_k(k_tiles=8, blocks_mn=4, slots=1000, n=1, in_features=512, bytes_per_element=1) == 2
    # plenty of blocks: no split
    assert configs.auto_split_k(k_tiles=144, blocks_mn=2200, slots=528, n=16, in_features=9216,
                                bytes_per_element=1) == 1
    # large N: the fp32 partial sums may not outweigh the weight's own bytes
    assert configs.auto_split_k(k_tiles=112, blocks_mn=10, slots=528, n=128, in_features=7168,
                                bytes_per_element=0.3) == 4


def test_config_table_round_trip(tmp_path, monkeypatch):
    table = {("sm90", "bitmap", "m8k-k8k", 16, "80"): LaunchConfig(nrows=16, strips=1, stages=4, split_k=6),
             ("sm90", "bitmap", "*", 8, "90"): LaunchConfig(nrows=8, decode="scatter"),
             ("sm90", "tiled_csl", "*", 16, "90"): LaunchConfig(nrows=16, words_per_stage=2048, warps=8),
             ("sm90", "tiled_csl", "*", 1, "90"): LaunchConfig(nrows=8, stages=4, words_per_stage=1536)}
    path = tmp_path / "tuned.json"
    configs.write_table(str(path), table)
    assert configs.read_table(str(path)) == table
    ns = {"LaunchConfig": LaunchConfig}
    literal = eval("{" + configs.python_literal(table) + "}", ns)  # noqa: S307 - our own output
    assert literal == table
    # the overlay named by FLASHLLM_KERNEL_CONFIGS wins over the built-in table
    monkeypatch.setenv("FLASHLLM_KERNEL_CONFIGS", str(path))
    monkeypatch.setattr(configs, "_overlay", None)
    assert configs.lookup("sm90", "bitmap", 7168, 7168, 16, 0.8) == table[("sm90", "bitmap", "m8k-k8k", 16, "80")]
    assert configs.lookup("sm90", "bitmap", 7168, 7168, 16, 0.5) is None  # neither there nor measured
    assert configs.lookup("sm90", "bitmap", 11008, 4096, 16, 0.5) == configs.TUNED[("sm90", "bitmap", "m16k-k8k", 16, "50")]
    monkeypatch.setattr(configs, "_overlay", None)


def test_tuning_candidates_are_valid():
    for fmt in ("bitmap", "tiled_csl", "tiled_csl16"):
        for n in (1, 16, 64, 128):
            for s in (0.5, 0.8, 0.9):
                cands = configs.tuning_candidates(fmt, n, s, k_tiles=112)
                assert len(cands) == len(set(cands)) >= 6
                for c in cands:
                    c.validate(fmt)
                # the benchmark's tuner offers every option; the library's retuning only validated ones
                wide = configs.tuning_candidates(fmt, n, s, k_tiles=112, unvalidated=True)
                assert set(cands) <= set(wide)
                assert all(c.validated() for c in cands)
                if fmt == "tiled_csl16":  # its own kernel: warps, stages and stage sizes, no options
                    assert {c.warps for c in cands} == set(configs.CSL_WARPS) and {c.stages for c in cands} == {3, 4, 6}
                    assert {(c.prefetch, c.fixup, c.pdl) for c in wide} == {(0, False, False)}
                    continue
                if fmt == "bitmap":
                    assert {c.decode for c in wide} == set(configs.DECODES)
                    assert {c.decode for c in cands} == {d for d in configs.DECODES if d not in configs.UNVALIDATED}
                else:
                    assert {c.warps for c in wide} == set(configs.CSL_WARPS)
                    assert {c.warps for c in cands} == {w for w in configs.CSL_WARPS if f"warps{w}" not in configs.UNVALIDATED}
                    assert {c.dense_tiles for c in wide} == set(configs.CSL_DENSE_TILES)
                    assert {c.dense_tiles for c in cands} == {t for t in configs.CSL_DENSE_TILES
                                                         if f"dense{t}" not in configs.UNVALIDATED}
                assert {c.prefetch for c in wide} == {0, 4}
                assert {c.prefetch for c in cands} == ({0} if "prefetch" in configs.UNVALIDATED else {0, 4})
                assert {c.fixup for c in wide} == {False, True}
                assert {c.fixup for c in cands} == ({False} if "fixup" in configs.UNVALIDATED else {False, True})


def test_default_rule_picks_the_options_where_they_won():
    # H200, 2026-11-26: scatter from 85% up to 16 rows; 8 Tiled-CSL warps at 75-85% up to 16 rows.
    assert configs.default_config("bitmap", 16, 0.9).decode == "scatter"
    assert configs.default_config("bitmap", 1, 0.85).decode == "scatter"
    assert configs.default_config("bitmap", 16, 0.8).decode == "fragment"
    assert configs.default_config("bitmap", 64, 0.9).decode == "fragment"
    assert configs.default_config("tiled_csl", 16, 0.8).warps == 8
    assert configs.default_config("tiled_csl", 1, 0.75).warps == 8
    assert configs.default_config("tiled_csl", 12, 0.9).warps == 4
    assert configs.default_config("tiled_csl", 16, 0.7).warps == 4
    assert configs.default_config("tiled_csl", 32, 0.8).warps == 4
    for fmt in ("bitmap", "tiled_csl", "tiled_csl16"):
        for n in (1, 8, 16, 32, 64, 128):
            for s in (0.0, 0.5, 0.75, 0.85, 0.99):
                assert configs.default_config(fmt, n, s).validate(fmt).validated()


# --- fitted bitmap value buffers (configs.FIT) ------------------------------------------------------
def test_fitted_value_buffers_leave_room_for_more_blocks():
    full, fit = LaunchConfig(nrows=16), LaunchConfig(nrows=16, value_cap=configs.FIT)
    assert fit.smem_bytes("bitmap") == full.smem_bytes("bitmap")  # unresolved: at most a full tile
    # each cap shrinks every stage's value buffer by 2 bytes a value
    for cap in configs.VALUE_CAPS[:-1]:
        capped = replace(full, value_cap=cap)
        assert full.smem_bytes("bitmap") - capped.smem_bytes("bitmap") == 3 * 2 * (4096 - cap)
        assert capped.defines("bitmap")["FLASHLLM_VALCAP"] == cap
    assert "FLASHLLM_VALCAP" not in full.defines("bitmap")  # full tiles keep their compile keys
    # H200: 228 KB per SM, 1 KB reserved per block, 9 blocks of 128 threads at 56 registers:
    # 50% sparsity fits 2560-value buffers, i.e. 9 resident blocks instead of 6 at N = 16
    per_sm = lambda cfg: 228 * 1024 // (cfg.smem_bytes("bitmap") + 1024)  # noqa: E731
    assert per_sm(full) == 6 and per_sm(replace(full, value_cap=2560)) >= 9
    with pytest.raises(ValueError, match="resolve it with fitted"):
        fit.defines("bitmap")


def test_fit_picks_the_smallest_cap_that_holds_the_longest_run():
    fit = LaunchConfig(nrows=16, value_cap=configs.FIT)
    assert [fit.fitted(r).value_cap for r in (0, 1024, 1025, 2049, 3072, 3073, 4096)] == \
        [1024, 1024, 1536, 2560, 3072, configs.FULL_TILE, configs.FULL_TILE]
    assert fit.fitted(None).value_cap == configs.FULL_TILE  # unknown (CUDA-graph capture): full tiles
    assert LaunchConfig(nrows=16, value_cap=1536).fitted(4000).value_cap == 1536  # only FIT is resolved
    assert fit.validated() == ("fit" not in configs.UNVALIDATED)
    assert replace(fit, value_cap=2048).validated() == fit.validated()  # what FIT resolves to counts as FIT


def test_pending_options_are_named_one_by_one():
    # device_check.sh smoke-tests each pending option on its own, by these names and benchmark entries.
    from flashllm.bench.kernels import parse_format
    from flashllm.kernels.configs import example_config

    pending = configs.pending_options()
    for name, formats in pending.items():
        assert name in configs.PENDING_NAMES and formats
        if name in configs.PENDING_FORMATS:  # a pending kernel: its entry is the format's name, no option
            assert formats == [name] and configs.unvalidated_options(example_config(name, {})) == []
            continue
        assert name in configs.OPTION_NAMES
        for entry in formats:  # each entry runs exactly that option (on the default launch)
            assert configs.unvalidated_options(example_config(*parse_format(entry))) == [name]
    both = LaunchConfig(nrows=16, value_cap=configs.FIT, prefetch=4)
    assert set(configs.unvalidated_options(both)) == {"fit", "prefetch"} & set(pending)
    assert both.validated() == (not ({"fit", "prefetch"} & set(pending)))
    assert configs.unvalidated_options(LaunchConfig(nrows=16)) == []


# --- split-K ended by the last block (LaunchConfig.fixup) ---------------------------------------------
def test_fixup_is_a_compile_option_of_both_kernels():
    for fmt, base in (("bitmap", LaunchConfig(nrows=16)), ("tiled_csl", LaunchConfig(nrows=16, words_per_stage=2048))):
        on = replace(base, fixup=True).validate(fmt)
        assert on.defines(fmt) == {**base.defines(fmt), "FLASHLLM_FIXUP": 1}  # off: the old cache keys
        assert on.smem_bytes(fmt) == base.smem_bytes(fmt)  # its flag reuses the pipeline's memory
        assert on.validated() == ("fixup" not in configs.UNVALIDATED)
        assert any(f == fmt and c.fixup for f, c in configs.checked_variants())
    with pytest.raises(ValueError, match="fixup must be True or False"):
        LaunchConfig(nrows=16, fixup=1).validate("bitmap")


def test_expansion_kernel_switch(monkeypatch, cuda_kernels):
    # Off by default until a GPU run validates it; FLASHLLM_EXPAND forces either way, and nothing
    # else is accepted.
    for flag, validated, expected in [("", False, False), ("", True, True), ("1", False, True), ("0", True, False)]:
        monkeypatch.setenv(configs.EXPAND_ENV, flag)
        monkeypatch.setattr(configs, "EXPAND_VALIDATED", validated)
        assert configs.expand_enabled() is expected
    monkeypatch.setenv(configs.EXPAND_ENV, "yes")
    with pytest.raises(ValueError, match="FLASHLLM_EXPAND='yes'"):
        configs.expand_enabled()
    for module in (bitmap_cuda, tiled_csl_cuda):
        cls = BitmapWeight if module is bitmap_cuda else TiledCSLWeight
        with pytest.raises(ValueError, match="expansion kernel needs CUDA tensors"):
            module.expand(cls.from_dense(torch.randn(70, 90, dtype=torch.float16)))
        with pytest.raises(TypeError, match="takes float16 or bfloat16"):
            module.expand(cls.from_dense(torch.randn(70, 90)))
    from flashllm.kernels import kernel_path

    for flag in ("0", "1"):
        monkeypatch.setenv(configs.EXPAND_ENV, flag)
        for fmt in ("bitmap", "tiled_csl"):
            assert ("expansion kernel" in kernel_path(fmt, "cuda")) == (flag == "1")


def test_forced_options_apply_on_top_of_the_table_per_format(monkeypatch):
    # FLASHLLM_KERNEL_OPTIONS: "option" for both formats, "format:option" for one; the table's or
    # the rule's choice is kept for everything else.
    monkeypatch.setattr(configs, "_forced", {})
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "fixup, bitmap:fit, tiled_csl:dense1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bitmap = configs.get_config("sm90", "bitmap", 11008, 4096, 16, 0.5)
        csl = configs.get_config("sm90", "tiled_csl", 11008, 4096, 16, 0.8)
    assert bitmap == replace(configs.TUNED[("sm90", "bitmap", "m16k-k8k", 16, "50")], fixup=True, value_cap=configs.FIT)
    assert csl.fixup and csl.dense_tiles == 1 and csl.value_cap == configs.FULL_TILE
    pending = {"fit", "fixup", "dense1"} & set(configs.pending_options())
    assert [str(w.message).count("not yet validated") for w in caught] == ([1] if pending else [])
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "tiled_csl:scatter")
    with pytest.raises(ValueError, match="FLASHLLM_KERNEL_OPTIONS=.tiled_csl:scatter.: Tiled-CSL needs"):
        configs.get_config("sm90", "tiled_csl", 4096, 4096, 16, 0.8)
    with pytest.raises(ValueError, match="unknown option 'scatter'|Tiled-CSL needs"):
        configs.forced_options("bitmap")  # a bad entry fails every launch, not only its format's
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "tiled_csl:stages4")
    assert configs.forced_options("bitmap") == {}  # the other format's launches are untouched
    assert configs.forced_options("tiled_csl") == {"stages": 4}
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "csr:fixup")
    with pytest.raises(ValueError, match="unknown entry 'csr:fixup'"):
        configs.get_config("sm90", "bitmap", 4096, 4096, 16, 0.8)
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "")
    assert not configs.get_config("sm90", "bitmap", 4096, 4096, 16, 0.8).fixup


def test_forcing_stream_k_on_a_two_strip_launch_runs_one_strip_per_block(monkeypatch):
    # Stream-K blocks run one strip at a time: forcing "persistent" on a table entry of two strips
    # per block (OPT-66B qkv at N = 16, 80%) must give a one-strip launch, not fail mid-benchmark.
    two_strips = next(c for c in configs.TUNED.values() if c.strips == 2)
    forced = configs.with_options(two_strips, {"persistent": True}, "bitmap")
    assert forced == replace(two_strips, persistent=True, strips=1)
    with pytest.raises(ValueError, match="one strip per block"):
        configs.with_options(two_strips, {"persistent": True, "strips": 2}, "bitmap")
    monkeypatch.setattr(configs, "_forced", {})
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "bitmap:persistent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the option may still be pending: its warning is tested above
        cfg = configs.get_config("sm90", "bitmap", 27648, 9216, 16, 0.8)
    assert cfg.persistent and cfg.strips == 1


def test_splitk_workspace_is_zeroed_once_kept_per_stream_and_grown_geometrically(monkeypatch):
    # The kernels leave the workspace zero, so it is zeroed only when allocated; on the CPU the same
    # bookkeeping runs on host tensors (streams are plain handles here).
    monkeypatch.setattr(launch, "_WORKSPACES", {})
    monkeypatch.setattr(launch, "_RETIRED", [])
    cpu = torch.device("cpu")
    first = launch.splitk_workspace(cpu, 7, floats=100, tiles=10)
    assert first.sums.dtype == torch.float32 and first.counters.dtype == torch.int32
    assert first.sums.numel() == 100 and first.counters.numel() == 10
    assert not first.sums.any() and not first.counters.any()
    assert launch.splitk_workspace(cpu, 7, floats=50, tiles=10) is first  # big enough: reused as is
    other = launch.splitk_workspace(cpu, 8, floats=50, tiles=3)  # another stream: its own
    assert other is not first and other.sums.numel() == 50
    grown = launch.splitk_workspace(cpu, 7, floats=120, tiles=4)
    assert grown.sums.numel() == 200 and grown.counters.numel() == 10  # doubled; counters unchanged
    assert launch._RETIRED == [first]  # a graph captured with it may still replay: never freed
    assert launch.splitk_workspace(cpu, 7, floats=1000, tiles=11).sums.numel() == 1000  # more than double


def test_value_caps_are_checked():
    with pytest.raises(ValueError, match="value_cap must be"):
        LaunchConfig(nrows=16, value_cap=1000).validate("bitmap")
    with pytest.raises(ValueError, match="default decode and value_cap"):
        LaunchConfig(nrows=16, words_per_stage=2048, value_cap=configs.FIT).validate("tiled_csl")
    LaunchConfig(nrows=16, value_cap=configs.FIT).validate("bitmap")


def test_largest_run_is_measured_once_per_version(gen):
    from flashllm.kernels.cuda_op import largest_run

    w = BitmapWeight.from_dense(pruned(200, 300, 0.7, torch.float16, gen))
    longest = int((w.offsets[1:] - w.offsets[:-1]).max())
    assert largest_run(w.offsets) == longest
    w.offsets._flashllm_largest_run = (w.offsets._version, -5)  # a second call reads the cache
    assert largest_run(w.offsets) == -5
    w.offsets.add_(0)  # an in-place change bumps the version: measured again
    assert largest_run(w.offsets) == longest
    with torch.inference_mode():
        frozen = w.offsets.clone()
    assert largest_run(frozen) == longest  # inference tensors have no version counter


def test_fit_buffers_sizes_from_the_weight_and_refuses_a_short_cap(gen):
    w = BitmapWeight.from_dense(pruned(130, 200, 0.3, torch.float16, gen))
    tensors = list(w.tensors().values())
    longest = int((w.offsets[1:] - w.offsets[:-1]).max())
    assert 2560 < longest <= 3072  # 64 x 64 tiles 70% dense: about 2870 values
    assert bitmap_cuda.KERNEL.fit_buffers(LaunchConfig(nrows=16, value_cap=configs.FIT), tensors).value_cap == 3072
    assert bitmap_cuda.KERNEL.fit_buffers(LaunchConfig(nrows=16), tensors).value_cap == configs.FULL_TILE
    with pytest.raises(ValueError, match="below this bitmap weight's longest tile run"):
        bitmap_cuda.KERNEL.fit_buffers(LaunchConfig(nrows=16, value_cap=1024), tensors)


@pytest.mark.parametrize("fmt", ["bitmap", "tiled_csl"])
def test_retuning_checks_candidates_against_the_formats_own_decode(fmt, gen):
    # FLASHLLM_RETUNE times candidates on a user's first call; each is first compared with this.
    from flashllm.formats import get_format

    module = cuda_module(fmt)
    dense = pruned(100, 150, 0.7, torch.float16, gen)
    w = get_format(fmt).from_dense(dense)
    x, bias = torch.randn(5, 150, generator=gen).half(), torch.randn(100, generator=gen).half()
    ref = module.KERNEL.reference(x, list(w.tensors().values()), 100, 150, bias)
    assert ref.dtype == torch.float32
    torch.testing.assert_close(ref, x.double() @ dense.double().T + bias.double(), rtol=1e-5, atol=1e-4,
                               check_dtype=False)
    assert launch.output_problem((x.float() @ dense.float().T + bias.float()).half(), ref) is None


def test_fitted_buffers_are_offered_to_tuning_and_checked():
    wide = configs.tuning_candidates("bitmap", 16, 0.5, k_tiles=64, unvalidated=True)
    assert {c.strips for c in wide if c.value_cap == configs.FIT} == {1, 2}
    checked = [cfg for fmt, cfg in configs.checked_variants() if fmt == "bitmap" and cfg.value_cap]
    assert {(c.nrows, c.strips, c.decode) for c in checked} >= {(n, s, d) for n, s, d, _ in configs.CHECKED_CAPS}
    assert all(c.value_cap in configs.VALUE_CAPS for c in checked)  # compilable: no FIT left
    # The shipped FIT launches compile at the cap a large layer of their band takes.
    shipped = dict.fromkeys(cfg for fmt, cfg in configs.shipped_variants() if fmt == "bitmap")
    assert {c.value_cap for c in shipped} >= {1024, 2560} and configs.FIT not in {c.value_cap for c in shipped}
    assert configs.typical_fit(LaunchConfig(nrows=16, value_cap=configs.FIT), 0.8).value_cap == 1024
    assert configs.typical_fit(LaunchConfig(nrows=16, value_cap=configs.FIT), 0.5).value_cap == 2560
    assert configs.typical_fit(LaunchConfig(nrows=16, value_cap=configs.FIT), 0.0).value_cap == configs.FULL_TILE
    assert configs.typical_fit(LaunchConfig(nrows=16), 0.9).value_cap == configs.FULL_TILE  # only FIT resolves


# --- launchers on a CPU-only machine ------------------------------------------------------------------
def test_importing_and_registration_touch_no_gpu_library():
    code = (
        "import sys, torch, flashllm\n"
        "from flashllm.kernels import FAST_KERNELS\n"
        "print(sorted(FAST_KERNELS), torch.cuda.is_initialized(), 'cupy' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FLASHLLM_CUDA_KERNELS"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert on.stdout.strip() == "[(1, 'cuda'), (2, 'cuda'), (3, 'cuda')] False False"  # registered by default
    off = subprocess.run([sys.executable, "-c", code], env={**env, "FLASHLLM_CUDA_KERNELS": "0"},
                         capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "[] False False"


def test_fast_kernels_decline_float32_without_touching_cuda():
    w = BitmapWeight.from_dense(torch.randn(8, 8))
    assert bitmap_cuda.fast_kernel(torch.randn(2, 8), list(w.tensors().values()), 8, 8, None) is None
    c = TiledCSLWeight.from_dense(torch.randn(8, 8))
    assert tiled_csl_cuda.fast_kernel(torch.randn(2, 8), list(c.tensors().values()), 8, 8, None) is None
    assert not torch.cuda.is_initialized()


def test_launcher_checks_name_the_problem():
    w = BitmapWeight.from_dense(torch.randn(64, 128).half())
    x = torch.randn(4, 128).half()
    with pytest.raises(ValueError, match=r"x must be \(N, 128\)"):
        bitmap_cuda.check_inputs(x[:, :100], w.masks, w.values, w.offsets, 64, 128, None)
    with pytest.raises(ValueError, match="masks has 0 entries"):
        bitmap_cuda.check_inputs(x, w.masks[:0], w.values, w.offsets, 64, 128, None)
    with pytest.raises(TypeError, match="values must be a contiguous 1-D torch.float16"):
        bitmap_cuda.check_inputs(x, w.masks, w.values.bfloat16(), w.offsets, 64, 128, None)
    with pytest.raises(ValueError, match="bias must be"):
        bitmap_cuda.check_inputs(x, w.masks, w.values, w.offsets, 64, 128, torch.zeros(63).half())
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        bitmap_cuda.check_inputs(x, w.masks, w.values, w.offsets, 64, 128, None)
    c = TiledCSLWeight.from_dense(torch.randn(64, 128).half())
    with pytest.raises(ValueError, match="offsets has"):
        tiled_csl_cuda.check_inputs(x, c.words, c.offsets[:-1], 64, 128, None)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        tiled_csl_cuda.check_inputs(x.float(), c.words, c.offsets, 64, 128, None)


def test_prepare_activations_pads_to_eight_columns():
    x = torch.randn(3, 13)
    xk, ldx, kx = launch.prepare_activations(x, 13)
    assert (ldx, kx) == (16, 16) and torch.equal(xk[:, :13], x) and not xk[:, 13:].any()
    y = torch.randn(3, 16)
    assert launch.prepare_activations(y, 16)[0] is y


def test_kernel_sources_ship_with_the_package():
    for name in ("common.cuh", "bitmap_spmm.cu", "tiled_csl_spmm.cu", "splitk_finalize.cu", "tiled_csl16_spmm.cu",
                 "tiled_csl16_expand.cu"):
        text = launch.kernel_source(name)
        assert "flashllm" in text and "#include <" not in text  # self-contained: no CUDA headers


# --- the sources compile with the sizes configs.py computes (NVRTC here, else nvcc, else skip) ------
def _compiler():
    try:
        return "nvrtc", launch.nvrtc()
    except launch.KernelUnavailable:
        pass
    if shutil.which("nvcc"):
        return "nvcc", None
    pytest.skip("neither NVRTC nor nvcc is available (set FLASHLLM_NVRTC to libnvrtc.so to run this)")


def test_kernels_compile_with_the_launchers_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHLLM_CACHE_DIR", "")
    kind, nvrtc = _compiler()
    variants = {}
    for fmt, cfg in configs.checked_variants():  # one per code shape keeps this quick
        variants.setdefault((fmt, cfg.nrows, cfg.strips, cfg.decode, cfg.warps, cfg.wgmma), cfg)
    for (fmt, *_), cfg in variants.items():
        src, name = configs.kernel_source(fmt), f"flashllm_{fmt}_spmm"
        opts = launch.compile_options("sm_90", cfg.defines(fmt), torch.float16)
        if kind == "nvrtc":
            assert len(launch.compile_image(src, name, opts, True, nvrtc)) > 1000
            bad = {**cfg.defines(fmt), "FLASHLLM_SMEM_BYTES": cfg.smem_bytes(fmt) + 16}
            with pytest.raises(RuntimeError, match="smem_bytes disagrees"):
                launch.compile_image(src, name, launch.compile_options("sm_90", bad, torch.float16), True, nvrtc)
        else:
            cuda_dir = os.path.join(os.path.dirname(launch.__file__), "cuda")
            defs = [f"-D{k}={v}" for k, v in cfg.defines(fmt).items()]
            subprocess.run(["nvcc", "-cubin", "-gencode=arch=compute_90a,code=sm_90a", "-std=c++17", f"-I{cuda_dir}",
                            "-DFLASHLLM_DTYPE=1", *defs, os.path.join(cuda_dir, src), "-o", str(tmp_path / "k.cubin")],
                           check=True)


def test_bitmap_selector_shift_matches_the_prmt_table():
    # bitmap_spmm.cu picks a lane's PRMT selector with a rotate, a mask and a 64-bit shift; it must
    # equal the 16-bit entry of the {SEL_LO, SEL_HI} table for the lane's 2 mask bits.
    torch.manual_seed(0)
    words = torch.randint(0, 1 << 32, (4096,), dtype=torch.int64)
    for lane in range(32):
        sh = (2 * lane) & 31
        amount = E.rotate_right(words, (sh - 4) & 31) & 0x30
        sel = (E.SEL_TABLE >> amount) & 0xFFFF
        bits = (words >> sh) & 3
        expected = E.prmt(E.SEL_LO, E.SEL_HI, bits * 0x22 + 0x10) & 0xFFFF
        assert torch.equal(sel, expected)
        assert torch.equal(amount, 16 * bits)


def test_compile_checks_quick_mode_keeps_every_code_shape():
    # scripts/compile_check.sh (quick mode) keeps the first checked variant per combination of the
    # defines that change code; one missing from its list would drop every variant of an option.
    import re
    from pathlib import Path

    script = (Path(__file__).parents[1] / "scripts" / "compile_check.sh").read_text()
    kept = set(re.search(r"if \(\$i ~ /([A-Z_|]+)/\)", script).group(1).split("|"))
    constants = {"FLASHLLM_STAGES", "FLASHLLM_SMEM_BYTES", "FLASHLLM_CAPW"}  # sizes, not code
    defines = {d for fmt, cfg in configs.checked_variants() for d in cfg.defines(fmt)} - constants
    assert {d.removeprefix("FLASHLLM_") for d in defines} <= kept


@pytest.mark.parametrize("stages", [2, 3, 4, 6])
@pytest.mark.parametrize("nk", [1, 2, 3, 5, 7, 16, 61])
def test_bulk_copy_barrier_phases(stages, nk):
    # bitmap_spmm.cu with FLASHLLM_BULK, its loop variables replayed: the prologue fills stages
    # 0..STAGES-2, iteration i waits on stage `st` for parity `phase`, then (after the barrier)
    # issues tile i + STAGES - 1 into `st_issue`. With the bytes landing at once, every wait must
    # find exactly the phase that carried tile i completed and the stage not a phase further
    # (try_wait.parity cannot tell phase k from k + 2), so it neither hangs nor reads another tile.
    completed = [0] * stages  # phases completed per stage's mbarrier
    carried: list[list[int]] = [[] for _ in range(stages)]  # tile of each phase
    for p in range(min(stages - 1, nk)):
        completed[p] += 1
        carried[p].append(p)
    st, st_issue, phase = 0, stages - 1, 0
    for i in range(nk):
        k = completed[st] - 1  # the last completed phase
        assert k >= 0 and k % 2 == phase, "the wait would hang on a phase no copy completes"
        assert completed[st] == i // stages + 1, "the stage is a phase ahead: parity would be ambiguous"
        assert carried[st][k] == i, "the stage holds another tile"
        j = i + stages - 1
        if j < nk:
            completed[st_issue] += 1
            carried[st_issue].append(j)
        st = 0 if st + 1 == stages else st + 1
        st_issue = 0 if st_issue + 1 == stages else st_issue + 1
        phase ^= 1 if st == 0 else 0


def test_programmatic_dependent_launch_is_an_sm90_option_of_both_kernels(monkeypatch):
    # FLASHLLM_PDL: a define of its own (the other builds keep their cache keys), both formats and
    # every other option (it touches only the prologue and the end of the main loop), from sm_90 on:
    # built for sm_90 and later, refused below with a message naming it, forcing it there refused.
    for fmt, cfg in (("bitmap", LaunchConfig(nrows=16)), ("tiled_csl", LaunchConfig(nrows=16, words_per_stage=2048))):
        on = replace(cfg, pdl=True).validate(fmt)
        assert on.defines(fmt)["FLASHLLM_PDL"] == 1 and "FLASHLLM_PDL" not in cfg.defines(fmt)
        assert on.smem_bytes(fmt) == cfg.smem_bytes(fmt)  # no shared memory of its own
        for arch, built in (("sm_80", False), ("sm_86", False), ("sm_90", True), ("sm_90a", True), ("sm_100", True)):
            assert launch.builds_for(arch, on.defines(fmt)) == built, arch
        with pytest.raises(launch.KernelUnavailable, match="pdl"):
            launch.compile_options("sm_80", on.defines(fmt), torch.float16)
        assert "--gpu-architecture=sm_90" in launch.compile_options("sm_90", on.defines(fmt), torch.float16)
    assert configs.pdl_capable("sm90") and configs.pdl_capable("sm100") and not configs.pdl_capable("sm89")
    # the split-K epilogue's own build: waits too, re-zeroes its workspace (no memset between launches)
    assert launch.finalize_job(True, pdl=True)[2] == {"FLASHLLM_REZERO": 1, "FLASHLLM_PDL": 1}
    assert launch.finalize_job(True, pdl=True) in launch.build_jobs()
    with_every = configs.with_options(LaunchConfig(nrows=16), {"pdl": True, "persistent": True, "offset_ring": True,
                                                             "bulk_copy": True, "fixup": True}, "bitmap")
    assert with_every.pdl and with_every.persistent
    forcing_works_on_sm90_only(monkeypatch, "pdl", [("bitmap", 16, 0.8), ("tiled_csl", 1, 0.9)], "bitmap", "pdl")
    # pending: offered by the tuner with the unvalidated options; the checked variants cover both kernels
    assert "pdl" in configs.UNVALIDATED or any(c.pdl for c in configs.candidates("bitmap", 16, 0.8))
    for fmt in ("bitmap", "tiled_csl"):
        assert any(c.pdl for c in configs.candidates(fmt, 16, 0.8, unvalidated=True))
        assert any(c.pdl for f, c in configs.checked_variants() if f == fmt)
