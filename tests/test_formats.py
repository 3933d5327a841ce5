import functools
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from conftest import DTYPES, SPARSITIES, random_sparse, same_bits, tiled_csl_version_1
from flashllm.formats import (FORMATS, FORMATS_BY_CODE, BitmapWeight, FormatError, TiledCSL16Weight, TiledCSLWeight,
                              bitmap, tiled_csl, tiled_csl16)

FORMAT_CLASSES = list(FORMATS.values())
ODD_SHAPES = [(1, 1), (1, 300), (300, 1), (59, 97), (129, 65), (257, 1025), (64, 64), (128, 64)]
LAYOUT_MODULES = {BitmapWeight: bitmap, TiledCSLWeight: tiled_csl, TiledCSL16Weight: tiled_csl16}


def tile_shape(cls) -> tuple[int, int]:
    module = LAYOUT_MODULES[cls]
    return (module.GROUP_M, module.GROUP_K) if cls is BitmapWeight else (module.TILE_M, module.TILE_K)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_round_trip_bit_exact(cls, dtype, sparsity, shape):
    w = random_sparse(*shape, sparsity, dtype)
    packed = cls.from_dense(w)
    assert same_bits(packed.to_dense(), w)
    assert packed.nnz == int((w != 0).sum())
    assert packed.dtype == dtype and packed.shape == shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97, 1.0])
def test_bitmap_decodes_the_same_a_strip_at_a_time(monkeypatch, dtype, sparsity):
    """`to_dense` gathers a bounded number of strips per step; one strip per step changes nothing, nor
    do int64 sources."""
    w = random_sparse(257, 1025, sparsity, dtype)
    packed = BitmapWeight.from_dense(w)
    whole = packed.to_dense()
    monkeypatch.setattr(bitmap, "CPU_DECODE_CHUNK", 1)
    assert same_bits(packed.to_dense(), w) and same_bits(whole, w)
    monkeypatch.setattr(bitmap, "INT32_SOURCES", 0)  # the int64 sources of weights past 2^31 values
    assert same_bits(packed.to_dense(), w)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_negative_zero_is_a_zero(cls):
    w = torch.tensor([[1.5, -0.0, 0.0, -2.0]], dtype=torch.float16)
    packed = cls.from_dense(w)
    assert packed.nnz == 2
    back = packed.to_dense()
    assert torch.equal(back, w) and not torch.signbit(back[0, 1])  # equal values, +0.0 for -0.0


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 300),
    sparsity=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    cls=st.sampled_from(FORMAT_CLASSES),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_hypothesis(rows, cols, sparsity, dtype, cls, seed):
    gen = torch.Generator().manual_seed(seed)
    w = random_sparse(rows, cols, sparsity, dtype, generator=gen)
    packed = cls.from_dense(w)
    assert same_bits(packed.to_dense(), w)
    assert same_bits(cls.from_state_dict(packed.state_dict()).to_dense(), w)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_tiles_all_dense_all_zero_and_mixed(cls):
    """Whole tiles at 100% density next to empty tiles: the published kernel's blind spot."""
    tile_m, tile_k = tile_shape(cls)
    w = torch.zeros(3 * tile_m + 5, 3 * tile_k + 7, dtype=torch.float16)
    w[:tile_m, :tile_k] = torch.rand(tile_m, tile_k).half() + 1  # 100% dense, no zero at all
    w[tile_m : 2 * tile_m, tile_k : 2 * tile_k] = random_sparse(tile_m, tile_k, 0.3, torch.float16)
    w[-5:, -7:] = torch.rand(5, 7).half() + 1  # a dense corner in the padded edge tile
    assert int((w[:tile_m, :tile_k] != 0).sum()) == tile_m * tile_k
    packed = cls.from_dense(w)
    assert same_bits(packed.to_dense(), w)
    assert packed.nnz == int((w != 0).sum())


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_negative_zero_is_stored_as_zero(cls):
    w = torch.tensor([[1.0, -0.0], [0.0, -2.0]], dtype=torch.float16)
    out = cls.from_dense(w).to_dense()
    assert torch.equal(out, w)  # -0.0 == 0.0 numerically; it is not a stored non-zero
    assert cls.from_dense(w).nnz == 2


def bitmap_nbytes_formula(w: torch.Tensor) -> int:
    m_pad = -(-w.shape[0] // 64) * 64
    k_pad = -(-w.shape[1] // 64) * 64
    tiles = torch.zeros(m_pad, k_pad, dtype=w.dtype)
    tiles[: w.shape[0], : w.shape[1]] = w
    nnz_t = (tiles.reshape(m_pad // 64, 64, k_pad // 64, 64) != 0).sum(dim=(1, 3)).flatten()
    values = int(((nnz_t + 7) // 8 * 8).sum())
    return m_pad * k_pad // 8 + w.element_size() * values + 4 * (nnz_t.numel() + 1) + 40


def csl_nbytes_formula(w: torch.Tensor, tile_m: int = 128) -> int:
    m_pad = -(-w.shape[0] // tile_m) * tile_m
    k_pad = -(-w.shape[1] // 64) * 64
    tiles = torch.zeros(m_pad, k_pad, dtype=w.dtype)
    tiles[: w.shape[0], : w.shape[1]] = w
    nnz_t = (tiles.reshape(m_pad // tile_m, tile_m, k_pad // 64, 64) != 0).sum(dim=(1, 3)).flatten()
    word = 8 if w.dtype == torch.float32 else 4
    return word * int(((nnz_t + 3) // 4 * 4).sum()) + 4 * (nnz_t.numel() + 1) + 40


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (100, 300), (576, 1536)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 1.0])
def test_nbytes_matches_docstring_formula(dtype, shape, sparsity):
    w = random_sparse(*shape, sparsity, dtype)
    for cls, formula in ((BitmapWeight, bitmap_nbytes_formula), (TiledCSLWeight, csl_nbytes_formula),
                         (TiledCSL16Weight, functools.partial(csl_nbytes_formula, tile_m=16))):
        packed = cls.from_dense(w)
        assert packed.nbytes == formula(w)
        stored = sum(t.numel() * t.element_size() for t in packed.state_dict().values())
        assert packed.nbytes == stored


@pytest.mark.parametrize("sparsity,bitmap_ratio,csl_ratio", [(0.5, 0.5625, 1.0), (0.7, 0.3625, 0.6), (0.9, 0.1625, 0.2)])
def test_bytes_per_weight_match_readme(sparsity, bitmap_ratio, csl_ratio):
    """The README's bytes-per-weight table, checked on a large fp16 layer (padding amortized)."""
    w = torch.randn(4096, 4096).half()
    flat = w.view(-1)
    flat[torch.randperm(flat.numel())[: int(sparsity * flat.numel())]] = 0
    dense = w.numel() * 2
    assert BitmapWeight.from_dense(w).nbytes / dense == pytest.approx(bitmap_ratio, abs=0.003)
    assert TiledCSLWeight.from_dense(w).nbytes / dense == pytest.approx(csl_ratio, abs=0.003)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_safetensors_and_torch_save_round_trip(cls, dtype):
    w = random_sparse(130, 70, 0.6, dtype)
    packed = cls.from_dense(w)
    restored = cls.from_state_dict(load(save(packed.state_dict())))
    assert same_bits(restored.to_dense(), w)
    buf = io.BytesIO()
    torch.save(packed.state_dict(), buf)
    buf.seek(0)
    assert same_bits(cls.from_state_dict(torch.load(buf)).to_dense(), w)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
@pytest.mark.parametrize("src,dst", [(torch.float32, torch.float16), (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_cast_matches_dense_cast(cls, src, dst):
    w = random_sparse(70, 90, 0.5, src)
    cast = cls.from_dense(w).to(dtype=dst)
    assert cast.dtype == dst
    assert torch.equal(cast.to_dense(), w.to(dst))
    assert same_bits(cls.from_state_dict(cast.state_dict()).to_dense(), cast.to_dense())


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_cast_overflow_is_refused(cls):
    w = torch.tensor([[1e6, 0.0], [1.0, 2.0]])
    with pytest.raises(ValueError, match="overflow"):
        cls.from_dense(w).to(dtype=torch.float16)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_bad_dense_input(cls):
    with pytest.raises(ValueError, match="2-D"):
        cls.from_dense(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="2-D"):
        cls.from_dense(torch.randn(4))
    with pytest.raises(TypeError, match="dtype"):
        cls.from_dense(torch.randn(4, 4).double())
    with pytest.raises(TypeError, match="dtype"):
        cls.from_dense(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cls.from_dense([[1.0, 2.0]])
    with pytest.raises(ValueError, match="empty"):
        cls.from_dense(torch.randn(0, 4))
    for bad in (float("inf"), float("-inf"), float("nan")):
        w = torch.randn(8, 8)
        w[3, 5] = bad
        with pytest.raises(ValueError, match="non-finite"):
            cls.from_dense(w)


def _corruptions(cls, state):
    """(description, corrupted state dict, expected message fragment)."""
    out = []
    for key in cls.tensor_names:
        out.append((f"missing {key}", {k: v for k, v in state.items() if k != key}, "missing"))
        out.append((f"truncated {key}", {**state, key: state[key][:-4]}, None))
    out.append(("no header", {k: v for k, v in state.items() if k != "header"}, "header"))
    for i, value, msg in ((0, 99, "format code"), (1, 99, "version 99"), (4, 42, "dtype"), (2, 0, "shape")):
        header = state["header"].clone()
        header[i] = value
        out.append((f"header[{i}]={value}", {**state, "header": header}, msg))
    out.append(("short header", {**state, "header": state["header"][:3]}, "header"))
    wrong_type = {**state, "offsets": state["offsets"].to(torch.int64)}
    out.append(("offsets int64", wrong_type, "int32"))
    bad_offsets = state["offsets"].clone()
    bad_offsets[1] += 4
    out.append(("shifted offset", {**state, "offsets": bad_offsets}, None))
    return out


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_corrupted_serialized_data_is_refused(cls):
    w = random_sparse(200, 150, 0.5, torch.float16)
    state = cls.from_dense(w).state_dict()
    for what, corrupt, msg in _corruptions(cls, state):
        with pytest.raises(FormatError, match=msg):
            cls.from_state_dict(corrupt)
            pytest.fail(f"{what} was accepted")


def test_bitmap_corrupted_mask_is_refused():
    state = BitmapWeight.from_dense(random_sparse(64, 64, 0.5, torch.float16)).state_dict()
    masks = state["masks"].clone()
    masks[:8] = 0xFF  # a whole 8x8 block marked dense: the tile's count no longer fits its run
    with pytest.raises(FormatError, match="disagree"):
        BitmapWeight.from_state_dict({**state, "masks": masks})


def test_bitmap_mask_in_padding_is_refused():
    w = random_sparse(60, 60, 0.0, torch.float16)
    state = BitmapWeight.from_dense(w).state_dict()
    dense = BitmapWeight.from_state_dict(state).to_dense()
    assert torch.equal(dense, w)
    # Set a bit in the last block (rows 56-63 x cols 56-63, outside 60x60) and fix the counts.
    padded = torch.zeros(64, 64, dtype=torch.float16)
    padded[:60, :60] = w
    padded[63, 63] = 1.0
    full = BitmapWeight.from_dense(padded).state_dict()
    with pytest.raises(FormatError, match="padding"):
        BitmapWeight.from_state_dict({**full, "header": state["header"]})


def test_csl_corrupted_slots_are_refused():
    w = random_sparse(128, 64, 0.5, torch.float16)
    state = TiledCSLWeight.from_dense(w).state_dict()
    values, slots = tiled_csl.split_words(state["words"], torch.float16)
    dup = slots.clone()
    dup[1] = dup[0]
    with pytest.raises(FormatError, match="repeated"):
        TiledCSLWeight.from_state_dict({**state, "words": tiled_csl.make_words(values, dup)})
    for bad in (tiled_csl.SENTINEL_SLOT + 2, 7, -2):  # past the spare slot, odd (half a value), negative
        far = slots.clone()
        far[0] = bad
        with pytest.raises(FormatError, match="outside"):
            TiledCSLWeight.from_state_dict({**state, "words": tiled_csl.make_words(values, far)})


@pytest.mark.parametrize("cls", [TiledCSLWeight, TiledCSL16Weight], ids=lambda c: c.name)
@pytest.mark.parametrize("corruption", ["repeat", "real after sentinel", "sentinel value", "extra sentinels",
                                        "no sentinel"])
def test_csl_corruption_inside_a_later_tile_is_refused(cls, corruption):
    # Two tiles; the second holds 5 non-zeros, so its run is 5 words and 3 sentinels.
    module = LAYOUT_MODULES[cls]
    tile_m = module.TILE_M
    w = torch.zeros(tile_m, 128, dtype=torch.float16)
    w[:, :64] = random_sparse(tile_m, 64, 0.7, torch.float16)
    for r, c in ((0, 3), (2, 10), (50, 1), (90, 63), (127, 0)):
        w[r % tile_m, 64 + c] = r + c + 1.0
    state = cls.from_dense(w).state_dict()
    values, slots = module.split_words(state["words"], torch.float16)
    start, sentinel = int(state["offsets"][1]), int(state["offsets"][1]) + 5
    assert slots[sentinel:].tolist() == [module.SENTINEL_SLOT] * 3
    words, offsets = None, state["offsets"]
    if corruption == "repeat":
        slots[start + 1] = slots[start]
    elif corruption == "real after sentinel":
        slots[sentinel - 1], slots[sentinel] = slots[sentinel].clone(), slots[sentinel - 1].clone()
    elif corruption == "sentinel value":
        values[sentinel + 1] = 1.0
    elif corruption == "extra sentinels":  # a whole extra vector of sentinels in the second tile
        pad = module.make_words(torch.zeros(4, dtype=torch.float16), torch.full((4,), module.SENTINEL_SLOT))
        words = torch.cat([state["words"], pad])
        offsets = offsets.clone()
        offsets[2] += 4
    else:  # no corruption: a sentinel turned into a location the tile lacks leaves 6 words and 2 sentinels
        slots[sentinel] = int(module.slot_of(torch.tensor(64 * 7 + 7)))
        values[sentinel] = 1.0
        loaded = cls.from_state_dict({**state, "words": module.make_words(values, slots)})
        w[7, 64 + 7] = 1.0
        assert same_bits(loaded.to_dense(), w)
        return
    words = module.make_words(values, slots) if words is None else words
    with pytest.raises(FormatError, match=f"{cls.name} (slots are repeated|padding is malformed)"):
        cls.from_state_dict({**state, "words": words, "offsets": offsets})
    assert same_bits(cls.from_state_dict(state).to_dense(), w)  # the intact data loads


def test_csl_words_decode_the_same_in_any_order_within_a_tile():
    w = random_sparse(256, 128, 0.6, torch.float16)
    state = TiledCSLWeight.from_dense(w).state_dict()
    words, offsets = state["words"].clone(), state["offsets"]
    _, slots = tiled_csl.split_words(words, torch.float16)
    gen = torch.Generator().manual_seed(3)
    for t in range(offsets.numel() - 1):  # shuffle each tile's non-zeros (sentinels stay last)
        lo = int(offsets[t])
        real = int((slots[lo : int(offsets[t + 1])] != tiled_csl.SENTINEL_SLOT).sum())
        words[lo : lo + real] = words[lo : lo + real][torch.randperm(real, generator=gen)]
    assert same_bits(TiledCSLWeight.from_state_dict({**state, "words": words}).to_dense(), w)


def test_csl_slots_are_swizzled_byte_offsets_ordered_for_conflict_free_stores():
    # The kernels store each value at the byte its word gives in a shared tile whose 16-byte chunks
    # are swizzled by row, and a warp's store c writes words 4 (32 b + l) + c of lanes l: in every
    # full group of 128 words each such store hits 32 different banks. A fixed weight: how many
    # rounds every bank fills depends on the draw (its rarest bank's count, 99-114 over seeds).
    w = random_sparse(128, 64, 0.5, torch.float16, generator=torch.Generator().manual_seed(0))
    c = TiledCSLWeight.from_dense(w)
    values, slots = tiled_csl.split_words(c.words, torch.float16)
    rows, cols = torch.nonzero(w, as_tuple=True)
    location = rows * 64 + cols
    expected = 2 * (location ^ ((location >> 3) & 0x38))
    assert sorted(slots[slots != tiled_csl.SENTINEL_SLOT].tolist()) == sorted(expected.tolist())
    assert int(tiled_csl.slot_of(torch.tensor(1 * 64 + 0))) == 2 * (64 + 8)  # row 1: chunk 0 -> chunk 1
    real = slots[slots != tiled_csl.SENTINEL_SLOT]
    rounds_with_every_bank = int(torch.bincount((real >> 2) % 32, minlength=32).min())
    assert rounds_with_every_bank >= 100
    lanes = torch.arange(32)
    for r in range(rounds_with_every_bank):  # round r: component r % 4 of group r // 4
        banks = (slots[128 * (r // 4) + 4 * lanes + r % 4] >> 2) % 32
        assert banks.unique().numel() == 32, r


def test_csl_version_1_data_is_converted_when_read(tmp_path):
    w = random_sparse(200, 150, 0.7, torch.float16)
    current = TiledCSLWeight.from_dense(w)
    v1_words, v1_offsets = tiled_csl_version_1(w)
    header = current.state_dict()["header"].clone()
    header[1] = 1
    v1 = {"header": header, "words": v1_words, "offsets": v1_offsets}
    loaded = TiledCSLWeight.from_state_dict(v1)
    assert same_bits(loaded.to_dense(), w)
    assert torch.equal(loaded.words, current.words) and torch.equal(loaded.offsets, current.offsets)
    values, _ = tiled_csl.split_words(v1_words, torch.float16)
    broken = {**v1, "words": tiled_csl.make_words(values, torch.full((values.numel(),), 9000))}
    with pytest.raises(FormatError, match="outside"):
        TiledCSLWeight.from_state_dict(broken)
    header[1] = 0
    with pytest.raises(FormatError, match="version 0 cannot be read"):
        TiledCSLWeight.from_state_dict({**v1, "header": header})


def test_csl_values_in_padding_are_refused():
    w = random_sparse(100, 50, 0.0, torch.float16)
    padded = torch.zeros(128, 64, dtype=torch.float16)
    padded[:100, :50] = w
    padded[120, 60] = 3.0
    state = TiledCSLWeight.from_dense(padded).state_dict()
    header = TiledCSLWeight.from_dense(w).state_dict()["header"]
    with pytest.raises(FormatError, match="padding"):
        TiledCSLWeight.from_state_dict({**state, "header": header})


def test_wrong_format_header_is_refused():
    state = BitmapWeight.from_dense(random_sparse(10, 10, 0.5)).state_dict()
    with pytest.raises(FormatError, match="format code"):
        TiledCSLWeight.from_state_dict(state)


@pytest.mark.parametrize("cls", FORMAT_CLASSES, ids=lambda c: c.name)
def test_layout_module_is_used_by_the_format(cls):
    """The storage order lives in one place: decoding storage order must invert encoding."""
    module = LAYOUT_MODULES[cls]
    m, k = tile_shape(cls)
    x = torch.arange(2 * m * 3 * k, dtype=torch.float32).reshape(2 * m, 3 * k)
    tiles = module.to_storage_order(x)
    assert tiles.shape == (6, m * k)
    assert torch.equal(module.from_storage_order(tiles, (2, 3)), x)
    # Tiles of one strip are consecutive along K.
    assert tiles[1].min() == k and tiles[3].min() == m * 3 * k


def test_csl_repeated_slots_are_found_in_every_pass_of_tiles():
    # Validation counts slots a bounded number of tiles at a time; a repeat in the last pass counts.
    w = random_sparse(128, 64 * 5, 0.5, torch.float16)
    state = TiledCSLWeight.from_dense(w).state_dict()
    values, slots = tiled_csl.split_words(state["words"], torch.float16)
    offsets = state["offsets"].to(torch.int64)
    tile_of = torch.arange(5).repeat_interleave(offsets.diff())
    real = slots != tiled_csl.SENTINEL_SLOT
    assert not tiled_csl._repeated_slots(offsets, tile_of, slots, real, tiles_per_pass=2)
    last = int(offsets[4])
    slots[last + 3] = slots[last]
    assert tiled_csl._repeated_slots(offsets, tile_of, slots, real, tiles_per_pass=2)
    # The same slot in two different tiles is no repeat: give tile 4's word one of tile 3's slots
    # that tile 4 does not hold.
    _, intact = tiled_csl.split_words(state["words"], torch.float16)
    free = [v for v in intact[int(offsets[3]) : last].tolist() if v not in set(intact[last:].tolist())]
    other_tile = intact.clone()
    other_tile[last] = free[0]
    assert not tiled_csl._repeated_slots(offsets, tile_of, other_tile, real, tiles_per_pass=2)


def test_csl_words_are_the_same_packed_in_passes_of_tiles():
    # Large layers are laid out a bounded number of tiles at a time; the result must not depend on it.
    w = random_sparse(700, 900, 0.6, torch.float16)
    tiles = tiled_csl.to_storage_order(torch.nn.functional.pad(w, (0, 960 - 900, 0, 768 - 700)))
    whole = tiled_csl.bank_ordered_words(tiles.view(torch.int16), tiles != 0)
    passes = tiled_csl.bank_ordered_words(tiles.view(torch.int16), tiles != 0, tiles_per_pass=7)
    assert torch.equal(whole[0], passes[0]) and torch.equal(whole[1], passes[1])


# --- tiled_csl16 ---------------------------------------------------------------------------------

def fragment_slot(r: int, c: int) -> int:
    """tiled_csl16's slot of row r, column c of a tile, as its layout spells it out."""
    s, kk = c >> 4, c & 15
    t, e, hi = (kk & 7) >> 1, kk & 1, kk >> 3
    h, g = r >> 3, r & 7
    lane, q, j = 4 * g + t, s >> 1, 4 * (s & 1) + 2 * hi + e
    return 1024 * h + 512 * q + 16 * lane + 2 * j


def test_csl16_slots_are_the_fragment_ordered_byte_offsets():
    expected = [fragment_slot(r, c) for r in range(16) for c in range(64)]
    locations = torch.arange(tiled_csl16.TILE_ELEMS)
    slots = tiled_csl16.slot_of(locations)
    assert slots.tolist() == expected
    assert sorted(expected) == list(range(0, 2048, 2))  # a bijection onto the even byte offsets
    assert torch.equal(tiled_csl16.location_of(slots), locations)
    assert torch.equal(tiled_csl16.location_of(torch.arange(0, 2048, 2))[torch.tensor(expected) // 2], locations)
    # The sentinel: one past the tile either way.
    assert tiled_csl16.SENTINEL_SLOT == 2048 == int(tiled_csl16.slot_of(torch.tensor(tiled_csl16.SENTINEL)))
    assert int(tiled_csl16.location_of(torch.tensor(tiled_csl16.SENTINEL_SLOT))) == tiled_csl16.SENTINEL == 1024
    # A lane's 16 bytes of one row half and k16 pair: its B registers of k16 steps 2q and 2q + 1.
    lane_bytes = [(r, c) for r in range(16) for c in range(64) if fragment_slot(r, c) // 16 == 5]
    assert lane_bytes == [(1, 2), (1, 3), (1, 10), (1, 11), (1, 18), (1, 19), (1, 26), (1, 27)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("shape", [(17, 65), (1, 1), (33, 130), (16, 64), (48, 192)])
def test_csl16_round_trip_bit_exact(dtype, sparsity, shape):
    w = random_sparse(*shape, sparsity, dtype)
    packed = TiledCSL16Weight.from_dense(w)
    assert same_bits(packed.to_dense(), w)
    assert packed.nnz == int((w != 0).sum())
    assert packed.words.dtype == (torch.int64 if dtype == torch.float32 else torch.int32)
    assert packed.offsets.numel() == -(-shape[0] // 16) * -(-shape[1] // 64) + 1
    assert same_bits(TiledCSL16Weight.from_state_dict(packed.state_dict()).to_dense(), w)
    assert packed.state_dict()["header"][:2].tolist() == [TiledCSL16Weight.format_code, 1]


def reference_tile_slots(slots: list[int]) -> list[int]:
    """A tile's slots in tiled_csl16's word order, written out from its layout: round-robin over
    the banks, rounds of 32 placed as component k % 4 of lanes 32 (k // 4) .. of each full group
    of 128; in the last partial group of n words, word k < 4 (n // 4) as component k // (n // 4)
    of lane k % (n // 4), the rest in round-robin order; sentinels last."""
    banks = [sorted(x for x in slots if (x >> 2) % 32 == b) for b in range(32)]
    seq = [bank[k] for k in range(32) for bank in banks if len(bank) > k]
    full = len(seq) // 128 * 128
    out = list(seq)
    for i in range(full):
        k, lane = divmod(i, 32)
        out[4 * (32 * (k // 4) + lane) + k % 4] = seq[i]
    m = (len(seq) - full) // 4
    for k in range(4 * m):
        out[full + 4 * (k % m) + k // m] = seq[full + k]
    return out + [tiled_csl16.SENTINEL_SLOT] * (-len(seq) % 4)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.97])
def test_csl16_words_are_ordered_for_conflict_free_warp_stores(sparsity):
    w = random_sparse(48, 192, sparsity, torch.float16)
    packed = TiledCSL16Weight.from_dense(w)
    _, slots = tiled_csl16.split_words(packed.words, torch.float16)
    tiles = tiled_csl16.to_storage_order(w)
    offsets = packed.offsets.tolist()
    lanes = torch.arange(32)
    for t in range(tiles.shape[0]):
        run = slots[offsets[t] : offsets[t + 1]]
        kept = tiled_csl16.slot_of(torch.nonzero(tiles[t]).squeeze(1))
        assert run.tolist() == reference_tile_slots(kept.tolist())
        # Store c of pass i writes word 4 (32 i + l) + c of lanes l. Every store of a full group
        # of 128 whose 32 words come from one round of all 32 banks hits 32 different banks.
        real = run[run != tiled_csl16.SENTINEL_SLOT]
        rounds_with_every_bank = int(torch.bincount((real >> 2) % 32, minlength=32).min())
        assert sparsity > 0 or rounds_with_every_bank == 32  # a dense tile: every store
        for k in range(min(rounds_with_every_bank, real.numel() // 128 * 4)):
            banks = (run[4 * (32 * (k // 4) + lanes) + k % 4] >> 2) % 32
            assert banks.unique().numel() == 32, (t, k)


def store_wavefronts(run: torch.Tensor) -> list[int]:
    """Shared-memory wavefronts of each warp store of the scatter over a tile's slots (store c of
    pass i: word 4 (32 i + l) + c of lanes l), counted as the most words of one store in a bank
    (two halves of one 32-bit word count twice: the format's order does not rely on them merging)."""
    out = []
    for i in range(-(-run.numel() // 128)):
        for c in range(4):
            at = 4 * (32 * i + torch.arange(32)) + c
            store = run[at[at < run.numel()]]
            store = store[store != tiled_csl16.SENTINEL_SLOT]
            if store.numel():
                out.append(int(torch.bincount((store >> 2) % 32).max()))
    return out


def test_csl16_tail_groups_store_with_few_bank_conflicts():
    # A tile's partial group holds a third or more of its words at 70-90%. Placed column-wise, the
    # scatter's stores cost 17-31% fewer wavefronts than with the round-robin order kept as it is
    # (tiled_csl's), within about 30% of a lower bound: each store takes at least one, and the
    # words of a tile's fullest bank at least one each.
    torch.manual_seed(0)
    for sparsity in (0.7, 0.8, 0.9):
        w = random_sparse(16 * 40, 64, sparsity, torch.float16)
        packed = TiledCSL16Weight.from_dense(w)
        _, slots = tiled_csl16.split_words(packed.words, torch.float16)
        offsets = packed.offsets.tolist()
        spread = kept = bound = 0
        for t in range(len(offsets) - 1):
            run = slots[offsets[t] : offsets[t + 1]]
            stores = store_wavefronts(run)
            spread += sum(stores)
            real = run[run != tiled_csl16.SENTINEL_SLOT]
            banks = [sorted(x for x in real.tolist() if (x >> 2) % 32 == b) for b in range(32)]
            seq = torch.tensor([bank[k] for k in range(32) for bank in banks if len(bank) > k])
            plain = seq.clone()
            for i in range(seq.numel() // 128 * 128):  # tiled_csl's order: full groups the same, the tail as it is
                k, lane = divmod(i, 32)
                plain[4 * (32 * (k // 4) + lane) + k % 4] = seq[i]
            kept += sum(store_wavefronts(plain))
            bound += max(len(stores), int(torch.bincount((real >> 2) % 32).max()))
        assert spread <= 0.9 * kept and spread <= 1.35 * bound, (sparsity, spread, kept, bound)


def test_csl16_words_are_the_same_packed_in_passes_of_tiles():
    w = random_sparse(100, 300, 0.6, torch.float16)
    tiles = tiled_csl16.to_storage_order(torch.nn.functional.pad(w, (0, 320 - 300, 0, 112 - 100)))
    whole = tiled_csl16.bank_ordered_words(tiles.view(torch.int16), tiles != 0, layout=tiled_csl16.LAYOUT)
    passes = tiled_csl16.bank_ordered_words(tiles.view(torch.int16), tiles != 0, tiles_per_pass=7,
                                            layout=tiled_csl16.LAYOUT)
    assert torch.equal(whole[0], passes[0]) and torch.equal(whole[1], passes[1])
    assert torch.equal(whole[0], TiledCSL16Weight.from_dense(w).words)
    with pytest.raises(ValueError, match="1024"):  # tiles of the other layout
        tiled_csl16.bank_ordered_words(tiles.view(torch.int16)[:8].reshape(1, -1),
                                       tiles[:8].reshape(1, -1) != 0, layout=tiled_csl16.LAYOUT)


def _csl16_state(w: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    state = TiledCSL16Weight.from_dense(w).state_dict()
    values, slots = tiled_csl16.split_words(state["words"], w.dtype)
    return state, values, slots


def _with_words(state: dict, values: torch.Tensor, slots: torch.Tensor) -> dict:
    return {**state, "words": tiled_csl16.make_words(values, slots)}


def test_csl16_corrupted_slots_are_refused():
    w = random_sparse(32, 128, 0.5, torch.float16)
    state, values, slots = _csl16_state(w)
    dup = slots.clone()
    dup[1] = dup[0]
    with pytest.raises(FormatError, match="tiled_csl16 slots are repeated"):
        TiledCSL16Weight.from_state_dict(_with_words(state, values, dup))
    for bad in (7, tiled_csl16.SENTINEL_SLOT + 2, -2):  # odd (half a value), past the spare slot, negative
        far = slots.clone()
        far[0] = bad
        with pytest.raises(FormatError, match="tiled_csl16 slots fall outside the 16x64 tile"):
            TiledCSL16Weight.from_state_dict(_with_words(state, values, far))
    inf = values.clone()
    inf[0] = float("inf")
    with pytest.raises(FormatError, match="inf or NaN"):
        TiledCSL16Weight.from_state_dict(_with_words(state, inf, slots))
    assert same_bits(TiledCSL16Weight.from_state_dict(state).to_dense(), w)  # the intact data loads


def test_csl16_repeated_slots_are_found_in_every_pass_of_tiles(monkeypatch):
    w = random_sparse(16, 64 * 5, 0.5, torch.float16)
    state, values, slots = _csl16_state(w)
    last = int(state["offsets"][4])
    slots[last + 3] = slots[last]
    monkeypatch.setattr(tiled_csl, "ELEMS_PER_COUNT", 2 * tiled_csl16.TILE_ELEMS)  # two tiles a pass
    with pytest.raises(FormatError, match="repeated"):
        TiledCSL16Weight.from_state_dict(_with_words(state, values, slots))


def test_csl16_values_in_padding_are_refused():
    w = random_sparse(10, 50, 0.0, torch.float16)
    padded = torch.zeros(16, 64, dtype=torch.float16)
    padded[:10, :50] = w
    header = TiledCSL16Weight.from_dense(w).state_dict()["header"]
    for r, c in ((15, 3), (2, 60)):  # below the last row, right of the last column
        bad = padded.clone()
        bad[r, c] = 3.0
        state = TiledCSL16Weight.from_dense(bad).state_dict()
        with pytest.raises(FormatError, match="tiled_csl16 stores non-zeros in the padding"):
            TiledCSL16Weight.from_state_dict({**state, "header": header})


def test_csl16_broken_offsets_are_refused():
    w = random_sparse(40, 130, 0.5, torch.float16)
    state = TiledCSL16Weight.from_dense(w).state_dict()
    offsets = state["offsets"]
    cases = []
    end = offsets.clone()
    end[-1] -= 4
    cases.append((end, "offsets span"))
    start = offsets.clone()
    start[0] = 4
    cases.append((start, "offsets span"))
    odd = offsets.clone()
    odd[1] += 2
    cases.append((odd, "non-decreasing multiples of 4"))
    backwards = offsets.clone()
    backwards[1], backwards[2] = offsets[2], offsets[1]
    cases.append((backwards, "non-decreasing multiples of 4"))
    cases.append((offsets[:-1], "entries where shape"))
    cases.append((offsets.to(torch.int64), "int32"))
    for bad, msg in cases:
        with pytest.raises(FormatError, match=msg):
            TiledCSL16Weight.from_state_dict({**state, "offsets": bad})


def test_format_codes_are_unique_and_headers_not_interchangeable():
    assert len({cls.format_code for cls in FORMAT_CLASSES}) == len(FORMAT_CLASSES)
    assert FORMATS_BY_CODE == {cls.format_code: cls for cls in FORMAT_CLASSES}
    w = random_sparse(20, 70, 0.5, torch.float16)
    for cls in FORMAT_CLASSES:
        state = cls.from_dense(w).state_dict()
        assert FORMATS_BY_CODE[int(state["header"][0])] is cls
        for other in FORMAT_CLASSES:
            if other is not cls:
                with pytest.raises(FormatError, match=f"format code {cls.format_code}, not {other.name} "):
                    other.from_state_dict(state)
