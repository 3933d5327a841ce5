"""The CUDA kernels on a GPU, against a float64 reference (run by scripts/device_check.sh).

Every check draws fresh random inputs, poisons the output with NaN before the launch, and bounds
the error by PyTorch's own error in the same dtype: ``err(ours) <= 2 * err(torch) + atol``, with
errors measured against float64. Shapes are not multiples of any tile; sparsities 0, 0.5, 0.8, 0.95
and 1; split-K on and off; float16 and bfloat16; every launch configuration the table can choose,
and the options tuning may pick (both bitmap decodes, fitted bitmap value buffers, 4 or 8 Tiled-CSL
warps; those not yet validated on a GPU are marked `unvalidated`).
"""

from __future__ import annotations

import csv
import importlib
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import flashllm
from flashllm.formats import BitmapWeight, TiledCSL16Weight, TiledCSLWeight
from flashllm.formats import bitmap as bitmap_format
from flashllm.kernels import FAST_KERNELS, configs, launch
from flashllm.kernels import bitmap_cuda, tiled_csl16_cuda, tiled_csl_cuda
from flashllm.kernels.configs import LaunchConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/device_check.sh runs these)"),
]

# The package re-exports the function `spmm` under the submodule's name: fetch the module itself.
spmm_module = importlib.import_module("flashllm.kernels.spmm")

# The two kernels that share the launch options (prefetch, fixup, rezero, wgmma, pdl, ...), and every
# kernel: tiled_csl16's has none of those options, and until its first GPU run its tests carry the
# pending marks (device_check.sh leaves them out if its smoke test fails).
FORMATS = {"bitmap": (BitmapWeight, bitmap_cuda), "tiled_csl": (TiledCSLWeight, tiled_csl_cuda)}
KERNELS = {**FORMATS, "tiled_csl16": (TiledCSL16Weight, tiled_csl16_cuda)}


def format_marks(fmt: str) -> list:
    return [pytest.mark.unvalidated, getattr(pytest.mark, f"unvalidated_{fmt}")] if fmt in configs.PENDING_FORMATS else []


EVERY_FORMAT = [pytest.param(f, marks=format_marks(f)) for f in KERNELS]
DTYPES = (torch.float16, torch.bfloat16)
SPARSITIES = (0.0, 0.5, 0.8, 0.95, 1.0)


@pytest.fixture(autouse=True)
def _needs_sm80():
    if torch.cuda.get_device_capability() < launch.MIN_CAPABILITY:
        pytest.skip(f"the kernels need compute capability 8.0+, this GPU is {torch.cuda.get_device_capability()}")


def random_weight(m: int, k: int, sparsity: float, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(m, k, device="cuda", dtype=torch.float32)
    w[torch.rand(m, k, device="cuda") < sparsity] = 0
    if sparsity >= 1.0:
        w.zero_()
    return w.to(dtype)


def check(fmt: str, m: int, k: int, n: int, sparsity: float, dtype: torch.dtype,
          config: LaunchConfig | None, with_bias: bool = True, x: torch.Tensor | None = None) -> torch.Tensor:
    cls, module = KERNELS[fmt]
    w = random_weight(m, k, sparsity, dtype)
    weight = cls.from_dense(w)
    x = torch.randn(n, k, device="cuda", dtype=dtype) if x is None else x
    bias = torch.randn(m, device="cuda", dtype=dtype) if with_bias else None
    out = torch.full((n, m), float("nan"), device="cuda", dtype=dtype)
    y = module.linear(x, weight, bias, config, out=out)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr()
    ref = x.double() @ w.double().T + (bias.double() if with_bias else 0)
    same_dtype = F.linear(x, w, bias).double()
    assert bool(torch.isfinite(y).all()), f"unwritten (NaN) or non-finite outputs: {int((~torch.isfinite(y)).sum())}"
    err = (y.double() - ref).norm().item()
    err_torch = (same_dtype - ref).norm().item()
    bound = 2 * err_torch + 1e-5 * ref.norm().item() + 1e-6
    assert err <= bound, f"{fmt} {dtype} {m}x{k} N={n} s={sparsity} {config}: err {err:.3e} > {bound:.3e}"
    return y


# --- correctness over the grid the issue asks for --------------------------------------------------
@pytest.mark.parametrize("fmt", EVERY_FORMAT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_sparsity_dtype_split(fmt, dtype, sparsity, split_k):
    cfg = configs.default_config(fmt, 17, sparsity)
    check(fmt, 200, 300, 17, sparsity, dtype, replace(cfg, split_k=split_k))


def pending_marks(cfg: LaunchConfig) -> list:
    """`unvalidated` and `unvalidated_<option>` for each of `cfg`'s options still pending
    (configs.unvalidated_options): device_check.sh leaves out the options that failed its smoke test."""
    names = configs.unvalidated_options(cfg)
    return [pytest.mark.unvalidated, *(getattr(pytest.mark, f"unvalidated_{n}") for n in names)] if names else []


def pending(**options):
    """Decorator: the marks of `pending_marks` for a test of the kernel options `options`."""
    def apply(test):
        for mark in pending_marks(replace(LaunchConfig(nrows=16), **options)):
            test = mark(test)
        return test
    return apply


@pending(decode="scatter")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_bitmap_scatter_decode(dtype, sparsity, split_k):
    # The scatter decode (configs.DECODES) over the same grid: tuning may pick it, so it must be
    # as exact as the default.
    cfg = replace(configs.default_config("bitmap", 17, sparsity), split_k=split_k, decode="scatter")
    check("bitmap", 200, 300, 17, sparsity, dtype, cfg)
    check("bitmap", 129, 190, 3, sparsity, dtype, replace(cfg, nrows=8))  # a partial strip, N < 8


@pending(value_cap=configs.FIT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("decode", configs.DECODES)
def test_bitmap_fitted_value_buffers(dtype, sparsity, decode):
    # Stage buffers sized to the weight's longest tile run (dense tiles: a full tile; empty: the
    # smallest cap), over the same grid as the default, split-K on and off.
    for split_k in (1, 3):
        cfg = replace(configs.default_config("bitmap", 17, sparsity), split_k=split_k, decode=decode,
                      value_cap=configs.FIT)
        check("bitmap", 200, 300, 17, sparsity, dtype, cfg)
    check("bitmap", 129, 190, 3, sparsity, dtype, replace(cfg, nrows=8))


@pending(value_cap=configs.FIT)
def test_bitmap_fitted_buffer_never_decodes_a_truncated_run(tmp_path):
    # The cap is measured from the offsets once and cached; a run longer than the cap (offsets
    # changed without the cache knowing) must stop the kernel, not return a wrong product. In a
    # child process: a trap leaves the CUDA context unusable.
    script = tmp_path / "stale.py"
    script.write_text(
        "import torch\n"
        "from flashllm.formats import BitmapWeight\n"
        "from flashllm.kernels import bitmap_cuda, configs\n"
        "w = BitmapWeight.from_dense(torch.randn(128, 256, device='cuda', dtype=torch.float16))\n"
        "w.offsets._flashllm_largest_run = (w.offsets._version, 100)  # claims the runs are short\n"
        "x = torch.randn(4, 256, device='cuda', dtype=torch.float16)\n"
        "cfg = configs.LaunchConfig(nrows=8, value_cap=configs.FIT)\n"
        "y = bitmap_cuda.linear(x, w, None, cfg)\n"
        "torch.cuda.synchronize()\n"
        "print('RESULT', float(y.float().abs().sum()))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "RESULT" not in proc.stdout, proc.stdout + proc.stderr
    assert "CUDA" in proc.stderr or "cuda" in proc.stderr, proc.stderr


@pending(warps=8)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("nrows", [16, 64])
def test_tiled_csl_eight_warps(dtype, sparsity, split_k, nrows):
    # 8 warps of 16 rows each instead of 4 of 32: the same grid as the default.
    cfg = replace(configs.default_config("tiled_csl", nrows, sparsity), split_k=split_k, warps=8, nrows=nrows)
    check("tiled_csl", 200, 300, 17, sparsity, dtype, cfg)
    check("tiled_csl", 129, 1000, nrows + 3, sparsity, dtype, cfg)


@pending(dense_tiles=1)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("nrows,stages,words", [(8, 3, 1024), (16, 2, 256), (64, 4, 2048)])
def test_tiled_csl_one_dense_tile(dtype, sparsity, split_k, nrows, stages, words):
    # Scatter, barrier, tensor cores on one dense tile: the same grid as the default, the 2-stage
    # minimum included, and 256-word stages so that tiles from 3% density reload in pieces.
    cfg = LaunchConfig(nrows=nrows, stages=stages, split_k=split_k, words_per_stage=words, dense_tiles=1)
    check("tiled_csl", 200, 300, 17, sparsity, dtype, cfg)
    check("tiled_csl", 129, 1000, nrows + 3, sparsity, dtype, cfg)


def builds_here(defines: dict[str, int]) -> bool:
    """Whether this GPU can build a variant: the warpgroup MMA (wgmma) exists on sm_90 alone, the
    programmatic dependent launch (pdl) from sm_90 on."""
    cc = torch.cuda.get_device_capability()
    return launch.builds_for(f"sm_{cc[0]}{cc[1]}", defines)


def skip_unless_built_here(cfg: LaunchConfig) -> None:
    if not builds_here({"FLASHLLM_WGMMA": int(cfg.wgmma), "FLASHLLM_PDL": int(cfg.pdl)}):
        pytest.skip(f"the warpgroup MMA (wgmma) runs on sm_90 GPUs only, programmatic dependent launch (pdl) "
                    f"from sm_90 on; this GPU is {torch.cuda.get_device_capability()}")


# Each format's wgmma cases: every N it has (Tiled-CSL n8 to n64, the bitmap kernel to n128), Tiled-CSL
# stages of 256 words so that tiles from 3% density reload in pieces (a barrier inside the scatter
# while the tensor cores run), bitmap value buffers full and fitted.
WGMMA_CASES = [
    *(("tiled_csl", LaunchConfig(nrows=n, stages=st, words_per_stage=w, wgmma=True))
      for n, st, w in ((8, 3, 2048), (16, 4, 256), (32, 3, 1024), (64, 3, 4096))),
    *(("bitmap", LaunchConfig(nrows=n, stages=st, value_cap=configs.FIT if fit else 0, wgmma=True))
      for n, st, fit in ((8, 3, False), (16, 4, True), (32, 3, False), (64, 3, True), (128, 3, False))),
]


@pending(wgmma=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("fmt,cfg", WGMMA_CASES, ids=[f"{f}-{c.nrows}" for f, c in WGMMA_CASES])
def test_wgmma(fmt, cfg, dtype, sparsity, split_k):
    # Hopper's warpgroup MMA in both kernels: odd shapes and many strips, a partial and two blocks
    # along N, bias on and off, and the last-block split-K.
    cfg = replace(cfg, split_k=split_k)
    skip_unless_built_here(cfg)
    check(fmt, 200, 300, max(1, cfg.nrows - 3), sparsity, dtype, cfg)
    check(fmt, 129, 1000, cfg.nrows + 5, sparsity, dtype, cfg, with_bias=False)
    check(fmt, 4000, 777, cfg.nrows, sparsity, dtype, replace(cfg, fixup=True, split_k=max(split_k, 2)))


@pending(wgmma=True)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("nrows", [8, 64])
def test_wgmma_operand_layouts_one_hot(fmt, nrows):
    # Exact products that locate a layout error: activation row n is one-hot at column c(n), so
    # y[n, m] must be exactly W[m, c(n)] (small integers: exact in fp16 and fp32). Where it is not,
    # the message says where the value came from: the weight element holding it (a wrong A
    # descriptor or swizzle), another activation row's column (B), or another output position (the
    # accumulator layout or the epilogue's pairing), so a failing GPU run shows which one to fix.
    cfg = LaunchConfig(nrows=nrows, stages=3, split_k=1, wgmma=True,
                       words_per_stage=2048 if fmt == "tiled_csl" else 0)
    skip_unless_built_here(cfg)
    cls, module = KERNELS[fmt]
    m, k = 128, 64
    rows, cols = torch.meshgrid(torch.arange(m), torch.arange(k), indexing="ij")
    w = ((rows * 13 + cols * 7) % 61 + 1).to(torch.float16).cuda()  # 1..61, no zeros
    cols_of = torch.tensor([(5 * i + 3) % k for i in range(nrows)])
    x = torch.zeros(nrows, k, dtype=torch.float16, device="cuda")
    x[torch.arange(nrows), cols_of.cuda()] = 1
    y = module.linear(x, cls.from_dense(w), None, cfg, out=torch.full((nrows, m), float("nan"), device="cuda",
                                                                     dtype=torch.float16))
    torch.cuda.synchronize()
    want = w[:, cols_of.cuda()].T  # (nrows, m)
    wrong = (y != want).nonzero().tolist()
    where = []
    for n_, m_ in wrong[:8]:
        got = float(y[n_, m_])
        at_w = [(int(a), int(b)) for a, b in (w == got).nonzero().tolist()[:3]]
        at_y = [(int(a), int(b)) for a, b in (want == got).nonzero().tolist()[:3]]
        where.append(f"y[{n_}, {m_}] = {got} (want {float(want[n_, m_])}; W holds it at {at_w}, "
                     f"the right output at {at_y})")
    assert not wrong, f"{len(wrong)} of {y.numel()} outputs wrong: " + "; ".join(where)


@pytest.mark.parametrize("sums", [pytest.param(s, marks=pending_marks(LaunchConfig(nrows=8, cores=s))) for s in (1, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_tiled_csl_cuda_cores(sums, dtype, sparsity, split_k):
    # One activation row on the CUDA cores (FLASHLLM_CORES, sums shared by the warps or per warp):
    # odd shapes and K past the last full tile, 2 and 6 stages, 256-word stages so that tiles from
    # 3% density reload in pieces, many strips, the last-block split-K; at sparsity 0 every warp
    # adds into every row at once (the compare-and-swap retries). More than one row is refused
    # before the launch.
    base = LaunchConfig(nrows=8, stages=3, split_k=split_k, words_per_stage=2048, cores=sums)
    check("tiled_csl", 200, 300, 1, sparsity, dtype, base)
    check("tiled_csl", 129, 1000, 1, sparsity, dtype, replace(base, stages=2, words_per_stage=256), with_bias=False)
    check("tiled_csl", 4000, 777, 1, sparsity, dtype, replace(base, stages=6, words_per_stage=1024))
    check("tiled_csl", 300, 2000, 1, sparsity, dtype, replace(base, fixup=True, split_k=max(split_k, 2)))
    with pytest.raises(ValueError, match="multiplies one activation row"):
        check("tiled_csl", 200, 300, 2, sparsity, dtype, base)


@pending(prefetch=4)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_l2_prefetch(fmt, dtype, sparsity, split_k):
    # A hint, so the product must not change: a deep K (the loop's prefetches and their clamp at
    # the block's last tile), a K shorter than the prefetch distance (the prologue's), and two
    # bitmap strips or 8 Tiled-CSL warps (one dense tile with prefetch: test_every_tiled_csl_variant).
    cfg = replace(configs.default_config(fmt, 17, max(sparsity, 0.5)), split_k=split_k, prefetch=4)
    check(fmt, 200, 2000, 17, sparsity, dtype, cfg)
    check(fmt, 130, 190, 9, sparsity, dtype, replace(cfg, prefetch=8))
    other = replace(cfg, warps=8) if fmt == "tiled_csl" else replace(cfg, strips=2)
    check(fmt, 300, 1000, 5, sparsity, dtype, other)


@pending(fixup=True)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_splitk_fixup(fmt, dtype, sparsity):
    # The last block of each output tile rounds it and re-zeroes the workspace: several splits,
    # N over two blocks along N and under 8, bias on and off, two layers sharing the workspace in
    # turn, each call on fresh inputs, so a workspace left dirty by one call would show in the next.
    for split_k, m, k, n in ((3, 200, 300, 17), (7, 129, 1000, 70), (2, 1000, 257, 5), (16, 64, 4096, 1)):
        cfg = replace(configs.default_config(fmt, n, max(sparsity, 0.5)), split_k=split_k, fixup=True)
        for with_bias in (True, False):
            check(fmt, m, k, n, sparsity, dtype, cfg, with_bias=with_bias)
    torch.cuda.synchronize()
    for ws in launch._WORKSPACES.values():
        assert not bool(ws.sums.any()) and not bool(ws.counters.any()), "a fixup launch left its workspace dirty"


@pending(persistent=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_stream_k_blocks(dtype, sparsity):
    # FLASHLLM_PERSISTENT: fewer tiles than resident slots (one tile per block), many more (ranges
    # crossing strips), one strip longer than any range, N over two blocks along N and under 8,
    # both decodes, fitted buffers, the L2 prefetch, bias on and off.
    for m, k, n, options in ((200, 300, 17, {}), (1000, 8192, 5, {}), (4173, 4100, 70, {"decode": "scatter"}),
                             (64, 65536, 1, {"prefetch": 4}), (3000, 2000, 9, {"value_cap": configs.FIT})):
        cfg = replace(configs.default_config("bitmap", n, max(sparsity, 0.5)), persistent=True, **options)
        for with_bias in (True, False):
            check("bitmap", m, k, n, sparsity, dtype, cfg, with_bias=with_bias)


@pending(persistent=True, fixup=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_stream_k_blocks_end_split_k_themselves(dtype, sparsity):
    # Stream-K with fixup: the block completing a strip's count of tiles rounds it, one launch per
    # product. Strips split over many blocks, whole strips in one block, N over two blocks along N,
    # fresh inputs each call on the kept workspace, which must be zero again afterwards.
    for m, k, n, options in ((200, 300, 17, {}), (1000, 8192, 5, {}), (4173, 4100, 70, {"decode": "scatter"}),
                             (64, 65536, 1, {}), (3000, 2000, 9, {"value_cap": configs.FIT})):
        cfg = replace(configs.default_config("bitmap", n, max(sparsity, 0.5)), persistent=True, fixup=True, **options)
        for with_bias in (True, False):
            check("bitmap", m, k, n, sparsity, dtype, cfg, with_bias=with_bias)
    torch.cuda.synchronize()
    for ws in launch._WORKSPACES.values():
        assert not bool(ws.sums.any()) and not bool(ws.counters.any()), "a stream-K fixup left its workspace dirty"


def over_pipeline_grid(**option):
    """Decorator: a test of a pending pipeline option (`pending` marks), over every dtype, sparsity
    and split-K on and off, the arguments `check_pipeline_grid` takes."""
    def apply(test):
        for mark in (pytest.mark.parametrize("split_k", [1, 3]), pytest.mark.parametrize("sparsity", SPARSITIES),
                     pytest.mark.parametrize("dtype", DTYPES), pending(**option)):
            test = mark(test)
        return test
    return apply


def check_pipeline_grid(dtype, sparsity, split_k, **option) -> LaunchConfig:
    """The bitmap pipeline's shapes for an option that changes how a tile's bytes arrive: K shorter
    than the pipeline (the prologue alone) and far longer (every stage reused many times), 2 and 6
    stages, two strips, the scatter decode with fitted buffers, bias on and off. Returns the
    option's base config for the cases a test adds."""
    base = replace(configs.default_config("bitmap", 17, max(sparsity, 0.5)), split_k=split_k, **option)
    check("bitmap", 200, 300, 17, sparsity, dtype, base)
    check("bitmap", 130, 5000, 9, sparsity, dtype, replace(base, stages=6), with_bias=False)
    check("bitmap", 300, 2000, 5, sparsity, dtype, replace(base, stages=2, strips=2))
    check("bitmap", 257, 3000, 16, sparsity, dtype, replace(base, decode="scatter", value_cap=configs.FIT))
    return base


@over_pipeline_grid(offset_ring=True)
def test_offset_ring(dtype, sparsity, split_k):
    # Run bounds from the shared ring (FLASHLLM_OFFSET_RING): the pipeline grid (look-ahead 2 to
    # 10 with 2 to 6 stages, the ring wrapping many times on the long K), and with stream-K blocks.
    base = check_pipeline_grid(dtype, sparsity, split_k, offset_ring=True)
    check("bitmap", 1000, 4096, 3, sparsity, dtype, replace(base, persistent=True))


@over_pipeline_grid(bulk_copy=True)
def test_bulk_copies(dtype, sparsity, split_k):
    # The weight's bytes by bulk copies on per-stage mbarriers (FLASHLLM_BULK; the cp.async path
    # below sm_90): the pipeline grid (each stage's barrier through many phases on the long K; two
    # strips, two copies of each kind per stage; at sparsity 1 tiles with no values, only the
    # masks' copy), and with the ring, stream-K blocks and the L2 prefetch.
    base = check_pipeline_grid(dtype, sparsity, split_k, bulk_copy=True)
    check("bitmap", 1000, 4096, 3, sparsity, dtype, replace(base, offset_ring=True, stages=6))
    check("bitmap", 1000, 4096, 33, sparsity, dtype, replace(base, persistent=True, prefetch=4))


@over_pipeline_grid(tiles_per_stage=2)
def test_two_tiles_per_stage(dtype, sparsity, split_k):
    # FLASHLLM_TPS = 2: the pipeline grid with two tiles per wait and barrier (odd tile counts end
    # on a half stage), and ending split-K in the last block.
    base = check_pipeline_grid(dtype, sparsity, split_k, tiles_per_stage=2)
    check("bitmap", 500, 64 * 7 + 5, 33, sparsity, dtype, replace(base, stages=3))  # 8 tiles, 3 per split
    check("bitmap", 300, 1000, 9, sparsity, dtype, replace(base, fixup=True, split_k=max(split_k, 2)))


@pending(rezero=True)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_splitk_rezero(fmt, dtype, sparsity):
    # The finalize launch re-zeroes the kept workspace (no memset): several splits, N over two
    # blocks along N and under 8, bias on and off, consecutive calls sharing the workspace on fresh
    # inputs, stream-K bitmap blocks too, so a workspace left dirty by one call shows in the next.
    cases = [(3, 200, 300, 17, {}), (7, 129, 1000, 70, {}), (2, 1000, 257, 5, {}), (16, 64, 4096, 1, {})]
    if fmt == "bitmap":
        cases.append((0, 1000, 4096, 9, {"persistent": True}))
    for split_k, m, k, n, options in cases:
        cfg = replace(configs.default_config(fmt, n, max(sparsity, 0.5)), split_k=split_k, rezero=True, **options)
        for with_bias in (True, False):
            check(fmt, m, k, n, sparsity, dtype, cfg, with_bias=with_bias)
    torch.cuda.synchronize()
    for ws in launch._WORKSPACES.values():
        assert not bool(ws.sums.any()), "a rezero launch left its workspace dirty"


@pytest.mark.parametrize("option", [pytest.param(o, marks=pending_marks(replace(LaunchConfig(nrows=16), **{o: True})))
                                    for o in ("fixup", "rezero")])
@pytest.mark.parametrize("fmt", FORMATS)
def test_splitk_kept_workspace_in_a_cuda_graph(fmt, option):
    # Captured on torch's capture stream, whose workspace (the first time) is allocated and zeroed
    # inside the capture; the replays must keep finding it zero, and the eager calls on the
    # default stream in between, with and without the option (fixup or rezero), must not disturb it.
    cls, module = KERNELS[fmt]
    w = random_weight(1000, 2048, 0.8, torch.float16)
    weight = cls.from_dense(w)
    cfg = replace(configs.default_config(fmt, 16, 0.8), split_k=4, **{option: True})
    static_x = torch.randn(16, 2048, device="cuda", dtype=torch.float16)
    module.linear(static_x, weight, None, cfg)  # compile and load before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = module.linear(static_x, weight, None, cfg)
    for i in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        module.linear(torch.randn_like(static_x), weight, None, replace(cfg, **{option: i == 1}))
        torch.cuda.synchronize()
        ref = static_x.double() @ w.double().T
        assert (static_y.double() - ref).norm() <= 2 * (F.linear(static_x, w).double() - ref).norm() + 1e-6


def product_chain(fmt: str, sizes: list[int], n: int, sparsity: float, dtype: torch.dtype,
                  cfgs: list[LaunchConfig]):
    """Weights (sizes[i + 1] x sizes[i]) and a product per weight, each one's input the output of the
    one before: (x, run, check) where run() poisons the outputs with NaN, launches the chain and
    returns the outputs, and check(outputs) compares each with float64 from its actual input."""
    cls, module = KERNELS[fmt]
    dense = [random_weight(m, k, sparsity, dtype) for k, m in zip(sizes, sizes[1:])]
    weights = [cls.from_dense(w) for w in dense]
    biases = [torch.randn(w.shape[0], device="cuda", dtype=dtype) for w in dense]
    x = torch.randn(n, sizes[0], device="cuda", dtype=dtype) / 4
    outs = [torch.empty(n, w.shape[0], device="cuda", dtype=dtype) for w in dense]

    def run():
        for out in outs:
            out.fill_(float("nan"))
        inp = x
        for weight, bias, cfg, out in zip(weights, biases, cfgs, outs):
            inp = module.linear(inp, weight, bias, cfg, out=out)
        return outs

    def check_outputs(outs_now):
        torch.cuda.synchronize()
        inp = x
        for i, (w, bias, y) in enumerate(zip(dense, biases, outs_now)):
            assert bool(torch.isfinite(y).all()), f"product {i}: {int((~torch.isfinite(y)).sum())} outputs stale or unwritten"
            ref = inp.double() @ w.double().T + bias.double()
            err_torch = (F.linear(inp, w, bias).double() - ref).norm().item()
            err = (y.double() - ref).norm().item()
            assert err <= 2 * err_torch + 1e-5 * ref.norm().item() + 1e-6, f"product {i}: err {err:.3e}"
            inp = y  # the next product's input is what this one wrote
    return x, run, check_outputs


@pending(pdl=True)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("split_k", [1, 3])
def test_programmatic_dependent_launch(fmt, dtype, sparsity, split_k):
    # Products whose input is the output of the product just before, every kernel launched to
    # overlap the previous one's tail: a kernel that read its activations (or the output the
    # finalize launch writes) before waiting would find the NaN poison or a half-written output.
    # Split-K chains the finalize launch too, which lets the next product start at once. Mixed
    # chains (pdl after an ordinary launch and the reverse), stream-K blocks, the last-block split-K.
    base = replace(configs.default_config(fmt, 17, max(sparsity, 0.5)), split_k=split_k, pdl=True)
    skip_unless_built_here(base)
    variants = [[base] * 4, [base, replace(base, pdl=False), base, replace(base, pdl=False)],
                [base, replace(base, fixup=True, split_k=max(split_k, 2)), base, base]]
    if fmt == "bitmap":
        variants.append([replace(base, persistent=True, strips=1)] * 4)
    for cfgs in variants:
        _, run, check_outputs = product_chain(fmt, [300, 1000, 257, 2000, 129], 17, sparsity, dtype, cfgs)
        for _ in range(3):  # a race shows some times, not every time
            check_outputs(run())


@pending(pdl=True)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("split_k", [1, 4])
def test_programmatic_dependent_launch_in_a_cuda_graph(fmt, split_k):
    # Stream capture turns the launches into programmatic edges between the graph's kernel nodes.
    cfg = replace(configs.default_config(fmt, 16, 0.8), split_k=split_k, pdl=True)
    skip_unless_built_here(cfg)
    x, run, check_outputs = product_chain(fmt, [2048, 1000, 3000, 512], 16, 0.8, torch.float16, [cfg] * 3)
    check_outputs(run())  # compiled, checked and loaded before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for _ in range(3):
        x.copy_(torch.randn_like(x) / 4)
        graph.replay()
        check_outputs(outs)


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (63, 65, 2), (129, 130, 9), (257, 1000, 33), (1000, 257, 64),
                                   (4173, 520, 5), (70, 4100, 100), (130, 190, 200)])
@pytest.mark.parametrize("split_k", [0, 1])
def test_odd_shapes(fmt, m, k, n, split_k):
    check(fmt, m, k, n, 0.8, torch.float16, replace(configs.default_config(fmt, n, 0.8), split_k=split_k))


def _checked(fmt):
    """Every checked variant of a format, the unvalidated ones marked so (device_check.sh can leave
    them out when its smoke step finds them broken)."""
    cfgs = sorted({cfg for f, cfg in configs.checked_variants() if f == fmt}, key=str)
    return [pytest.param(c, id=str(c), marks=pending_marks(c)) for c in cfgs]


@pytest.mark.parametrize("cfg", _checked("bitmap"))
def test_every_bitmap_variant(cfg):
    skip_unless_built_here(cfg)
    # A fitted value buffer (value_cap) must hold every tile's run: weights sparse enough that a
    # tile averages 80% of the cap (a run past it would be refused with a ValueError).
    sparsity = 1 - 0.8 * cfg.value_cap / 4096 if cfg.value_cap else 0.7
    for n in {max(1, cfg.nrows - 3), cfg.nrows + 5}:  # a partial block, and two blocks along N
        check("bitmap", 300, 700, n, sparsity, torch.float16, cfg)
    check("bitmap", 130, 200, cfg.nrows, sparsity if cfg.value_cap else 0.5, torch.bfloat16, replace(cfg, split_k=2))


@pytest.mark.parametrize("cfg", _checked("tiled_csl"))
def test_every_tiled_csl_variant(cfg):
    # The CUDA-core path (cores) multiplies one activation row.
    skip_unless_built_here(cfg)
    for n in {1} if cfg.cores else {max(1, cfg.nrows - 3), cfg.nrows + 5}:
        check("tiled_csl", 300, 700, n, 0.7, torch.float16, cfg)
    check("tiled_csl", 130, 200, 1 if cfg.cores else cfg.nrows, 0.5, torch.bfloat16, replace(cfg, split_k=2))


@pytest.mark.parametrize("cfg", [pytest.param(c, id=str(c), marks=format_marks("tiled_csl16"))
                                 for c in sorted({c for f, c in configs.checked_variants() if f == "tiled_csl16"}, key=str)])
def test_every_tiled_csl16_variant(cfg):
    for n in {max(1, cfg.nrows - 3), cfg.nrows + 5}:  # a partial block, and two blocks along N
        check("tiled_csl16", 300, 700, n, 0.7, torch.float16, cfg)
    check("tiled_csl16", 130, 200, cfg.nrows, 0.5, torch.bfloat16, replace(cfg, split_k=2))


@pytest.mark.parametrize("warps", configs.CSL_WARPS)
@pytest.mark.parametrize("x_rows,bulk", [(128, False), (64, False), (128, True), (64, True)])
@pytest.mark.parametrize("sparsity,words,stages", [(0.0, 64, 2), (0.0, 1024, 3), (0.5, 256, 6), (0.95, 64, 4)])
@pytest.mark.parametrize("dtype", [pytest.param(d, marks=format_marks("tiled_csl16")) for d in DTYPES])
def test_tiled_csl16_over_full_tiles_and_chunks(warps, x_rows, bulk, sparsity, words, stages, dtype):
    # Tiles with more words than a warp's stage holds scatter the rest from global memory; K = 2100
    # is 33 tiles, several activation chunks (x_rows / NROWS tiles each) and run-bound windows (16);
    # the words by cp.async, or by bulk copies (sm_90; elsewhere the same build runs cp.async), empty
    # tiles (95%) completing their stage's phase with no bytes.
    cfg = LaunchConfig(nrows=16, stages=stages, words_per_stage=words, warps=warps, x_rows=x_rows, bulk_copy=bulk)
    for split in (1, 2):
        check("tiled_csl16", 257, 2100, 19, sparsity, dtype, replace(cfg, split_k=split))
    check("tiled_csl16", 33, 130, 70, sparsity, dtype, replace(cfg, nrows=64, split_k=1))


@pytest.mark.parametrize("sparsity,words", [(0.0, 256), (0.0, 8192), (0.3, 2048), (0.9, 256)])
def test_tiled_csl_dense_tiles_reload(sparsity, words):
    # Tiles denser than the stage buffer load the rest in pieces: all of them must land.
    check("tiled_csl", 256, 384, 16, sparsity, torch.float16, LaunchConfig(nrows=16, stages=3, words_per_stage=words))


def test_kernel_reports_no_spills():
    problems = []
    for fmt, cfgs in (("bitmap", _checked("bitmap")), ("tiled_csl", _checked("tiled_csl")),
                      ("tiled_csl16", _checked("tiled_csl16"))):
        _, module = KERNELS[fmt]
        for cfg in (p.values[0] for p in cfgs):
            if not builds_here(cfg.defines(fmt)):
                continue  # (wgmma: sm_90 only)
            for dtype in DTYPES:
                kernel = launch.get_kernel(module.KERNEL.source, module.KERNEL.kernel, cfg.defines(fmt), dtype,
                                           torch.device("cuda"), cfg.smem_bytes(fmt), cfg.threads)
                report = (f"{fmt} {cfg} {dtype}: {kernel.registers} registers, {kernel.local_bytes} B local, "
                          f"{cfg.smem_bytes(fmt)} B smem, {kernel.occupancy} blocks/SM")
                print(report)
                if kernel.local_bytes or kernel.occupancy < 1:
                    problems.append(report)
    assert not problems, "local memory (spills) or no resident block:\n" + "\n".join(problems)


# --- activations the launcher must copy first ----------------------------------------------------
@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_strided_and_unaligned_activations(fmt):
    big = torch.randn(9, 333, device="cuda", dtype=torch.float16)
    check(fmt, 150, 300, 9, 0.8, torch.float16, None, x=big[:, 5:305])  # misaligned view, K % 8 != 0
    check(fmt, 150, 300, 5, 0.8, torch.float16, None, x=big[:5, :300].t().contiguous().t())  # column-major


# --- determinism: without split-K every element has one writer -------------------------------------
@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_repeatable_without_split(fmt):
    cls, module = KERNELS[fmt]
    w = cls.from_dense(random_weight(513, 777, 0.8, torch.float16))
    x = torch.randn(24, 777, device="cuda", dtype=torch.float16)
    cfg = replace(configs.default_config(fmt, 24, 0.8), split_k=1)
    first = module.linear(x, w, None, cfg)
    for _ in range(4):
        assert torch.equal(module.linear(x, w, None, cfg), first), "results move between runs: a race"


# --- through spmm, SparseLinear, torch.compile and CUDA graphs -----------------------------------
@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_spmm_uses_the_kernel(fmt, cuda_kernels, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference path ran although a CUDA kernel is registered")

    monkeypatch.setattr(spmm_module, "reference_linear", no_reference)
    cls, _ = KERNELS[fmt]
    w = random_weight(96, 160, 0.8, torch.float16)
    x = torch.randn(2, 3, 160, device="cuda", dtype=torch.float16)
    y = flashllm.spmm(x, cls.from_dense(w))
    ref = x.double() @ w.double().T
    assert y.shape == (2, 3, 96)
    assert (y.double() - ref).norm() <= 2 * (F.linear(x, w).double() - ref).norm() + 1e-6


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float32))
def test_formats_round_trip_on_the_gpu(fmt, dtype, monkeypatch):
    """Encoding and the reference path's decoding run on CUDA tensors too, bit for bit (the bitmap
    decoding both in one step and a strip per step)."""
    cls, _ = KERNELS[fmt]
    for shape, sparsity in (((257, 1025), 0.5), ((129, 65), 0.95), ((64, 64), 0.0), ((3, 5), 1.0)):
        w = random_weight(*shape, sparsity, dtype)
        packed = cls.from_dense(w)
        assert packed.device.type == "cuda" and torch.equal(packed.to_dense(), w)
        with monkeypatch.context() as patch:
            patch.setattr(bitmap_format, "DECODE_CHUNK", 1)
            assert torch.equal(packed.to_dense(), w)


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_spmm_declines_what_it_does_not_serve(fmt, cuda_kernels):
    cls, _ = KERNELS[fmt]
    w32 = random_weight(64, 64, 0.5, torch.float32)
    x32 = torch.randn(4, 64, device="cuda")
    assert FAST_KERNELS[(cls.format_code, "cuda")](x32, list(cls.from_dense(w32).tensors().values()), 64, 64, None) is None
    torch.testing.assert_close(flashllm.spmm(x32, cls.from_dense(w32)), F.linear(x32, w32))
    w16 = random_weight(64, 64, 0.5, torch.float16)
    big = torch.randn(configs.MAX_FAST_N + 1, 64, device="cuda", dtype=torch.float16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(configs.EXPAND_ENV, "0")  # prefill-sized products go to the reference path
        assert FAST_KERNELS[(cls.format_code, "cuda")](big, list(cls.from_dense(w16).tensors().values()), 64, 64,
                                                       None) is None


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (63, 65), (129, 200), (257, 1025), (1000, 4104)])
def test_expansion_kernel(fmt, dtype, shape):
    # The prefill path's expansion: every element written (the output is poisoned), bit for bit.
    cls, module = KERNELS[fmt]
    for sparsity in SPARSITIES:
        packed = cls.from_dense(random_weight(*shape, sparsity, dtype))
        out = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
        dense = module.expand(packed, out=out)
        torch.cuda.synchronize()
        assert dense.data_ptr() == out.data_ptr()
        assert torch.equal(dense.view(torch.int16), packed.to_dense().view(torch.int16)), (shape, sparsity)
        assert torch.equal(module.expand(packed), packed.to_dense())


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_products_expand_with_the_kernel(fmt, dtype, cuda_kernels, monkeypatch):
    monkeypatch.setenv(configs.EXPAND_ENV, "1")

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference path ran although the expansion kernel is on")

    monkeypatch.setattr(spmm_module, "reference_linear", no_reference)
    w = random_weight(300, 520, 0.7, dtype)
    bias = torch.randn(300, device="cuda", dtype=dtype)
    x = torch.randn(2, configs.MAX_FAST_N // 2 + 3, 520, device="cuda", dtype=dtype)  # more rows than MAX_FAST_N
    y = flashllm.spmm(x, KERNELS[fmt][0].from_dense(w), bias)
    ref = x.double() @ w.double().T + bias.double()
    assert y.shape == (*x.shape[:-1], 300)
    assert (y.double() - ref).norm() <= 2 * (F.linear(x, w, bias).double() - ref).norm() + 1e-6


# --- the first-use check (kernels/self_check.py) ------------------------------------------------------
@pytest.fixture
def fresh_checks():
    """Every variant checked again, and every decline warned again, in this test and after it."""
    def clear():
        for _, module in KERNELS.values():
            module.KERNEL._verdicts.clear()
            module.KERNEL._declined.clear()
    clear()
    yield
    clear()


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
@pytest.mark.parametrize("dtype", DTYPES)
def test_first_use_check_passes_the_variants_products_pick(fmt, dtype, cuda_kernels, fresh_checks, recwarn):
    cls, module = KERNELS[fmt]
    for sparsity in (0.5, 0.9):
        w = random_weight(300, 520, sparsity, dtype)
        packed = cls.from_dense(w)
        for n in (1, 8, 16, 33, 64):
            x = torch.randn(n, 520, device="cuda", dtype=dtype)
            y = flashllm.spmm(x, packed)
            ref = x.double() @ w.double().T
            assert (y.double() - ref).norm() <= 2 * (F.linear(x, w).double() - ref).norm() + 1e-6
    verdicts = module.KERNEL._verdicts
    assert len(verdicts) >= 2 and all(v is None for v in verdicts.values()), verdicts
    assert not [w for w in recwarn if "first-use" in str(w.message)]


@pytest.mark.parametrize("fmt", EVERY_FORMAT)
def test_a_variant_failing_its_first_use_check_is_never_used(fmt, cuda_kernels, fresh_checks, monkeypatch):
    from flashllm.kernels import self_check

    cls, module = KERNELS[fmt]
    real = self_check.check_variant

    def with_a_planted_fault(kernel, cfg, dtype, device):
        def run(*args):
            y = kernel.run(*args)
            y[0, 0] += 100
            return y
        return real(kernel, cfg, dtype, device, run=run)

    monkeypatch.setattr(self_check, "check_variant", with_a_planted_fault)
    ran = []
    monkeypatch.setattr(spmm_module, "reference_linear",
                        lambda *a, _real=spmm_module.reference_linear, **k: ran.append(1) or _real(*a, **k))
    w = random_weight(96, 160, 0.8, torch.float16)
    x = torch.randn(5, 160, device="cuda", dtype=torch.float16)
    with pytest.warns(UserWarning, match="failed the first-use check on this GPU: max error"):
        y = flashllm.spmm(x, cls.from_dense(w))
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-2, atol=1e-2)
    assert ran and all("max error" in v for v in module.KERNEL._verdicts.values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_expansion_kernel_failing_its_check_is_never_used(fmt, cuda_kernels, fresh_checks, monkeypatch):
    from flashllm.kernels import self_check

    monkeypatch.setenv(configs.EXPAND_ENV, "1")
    assert self_check.check_expansion(KERNELS[fmt][1].KERNEL, torch.float16, torch.device("cuda")) is None
    monkeypatch.setattr(self_check, "check_expansion", lambda kernel, dtype, device: "planted")
    w = random_weight(96, 160, 0.8, torch.float16)
    x = torch.randn(configs.MAX_FAST_N + 5, 160, device="cuda", dtype=torch.float16)
    with pytest.warns(UserWarning, match="expansion kernel failed the first-use check on this GPU: planted"):
        y = flashllm.spmm(x, KERNELS[fmt][0].from_dense(w))
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sparse_linear_module(fmt, cuda_kernels):
    linear = torch.nn.Linear(300, 200, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight[torch.rand_like(linear.weight, dtype=torch.float32) < 0.7] = 0
    sparse = flashllm.SparseLinear.from_linear(linear, fmt)
    x = torch.randn(5, 300, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ linear.weight.double().T + linear.bias.double()
    assert (sparse(x).double() - ref).norm() <= 2 * (linear(x).double() - ref).norm() + 1e-6


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_compile(fmt, cuda_kernels):
    cls, _ = KERNELS[fmt]
    w = random_weight(256, 512, 0.8, torch.float16)
    weight = cls.from_dense(w)
    bias = torch.randn(256, device="cuda", dtype=torch.float16)
    # aot_eager runs dynamo and the op's fake implementation (what compiling needs from us) without
    # spending device-session time in Inductor's code generation.
    fn = torch.compile(lambda x: torch.relu(flashllm.spmm(x, weight, bias)), fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 512, device="cuda", dtype=torch.float16)
    ref = torch.relu(x.double() @ w.double().T + bias.double())
    assert (fn(x).double() - ref).norm() <= 2 * (torch.relu(F.linear(x, w, bias)).double() - ref).norm() + 1e-6


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [16, configs.MAX_FAST_N + 5])
def test_cuda_graph_replay(fmt, rows, cuda_kernels, monkeypatch):
    # Above MAX_FAST_N rows the prefill path runs: the expanded weight is allocated and written
    # inside the capture, and each replay expands again into the graph's memory.
    monkeypatch.setenv(configs.EXPAND_ENV, "1")
    cls, _ = KERNELS[fmt]
    w = random_weight(1000, 2048, 0.8, torch.float16)
    weight = cls.from_dense(w)
    static_x = torch.randn(rows, 2048, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and load the kernels before capturing
            flashllm.spmm(static_x, weight)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = flashllm.spmm(static_x, weight)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        ref = static_x.double() @ w.double().T
        assert (static_y.double() - ref).norm() <= 2 * (F.linear(static_x, w).double() - ref).norm() + 1e-6


# --- errors for inputs that are plainly wrong ----------------------------------------------------
def test_errors_name_the_problem():
    w = BitmapWeight.from_dense(random_weight(64, 128, 0.5, torch.float16))
    x = torch.randn(4, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        bitmap_cuda.linear(x.float(), BitmapWeight.from_dense(random_weight(64, 128, 0.5, torch.float32)))
    with pytest.raises(ValueError, match="masks has"):
        bitmap_cuda.bitmap_linear(x, w.masks[:-512], w.values, w.offsets, 64, 128)
    misaligned = torch.empty(w.values.numel() + 1, device="cuda", dtype=torch.float16)[1:]
    misaligned.copy_(w.values)
    with pytest.raises(ValueError, match="aligned"):
        bitmap_cuda.bitmap_linear(x, w.masks, misaligned, w.offsets, 64, 128)
    with pytest.raises(ValueError, match="out must be"):
        bitmap_cuda.linear(x, w, out=torch.empty(4, 65, device="cuda", dtype=torch.float16))
    c = TiledCSLWeight.from_dense(random_weight(64, 128, 0.5, torch.float16))
    with pytest.raises(ValueError, match="offsets has"):
        tiled_csl_cuda.tiled_csl_linear(x, c.words, c.offsets[:-1], 64, 128)


# --- the diagnostic probe builds (flashllm.bench.probes) --------------------------------------------
@pytest.mark.parametrize("method", ["bitmap", "bitmap:scatter", "tiled_csl", pytest.param(
    "tiled_csl:dense1", marks=pending_marks(LaunchConfig(nrows=16, words_per_stage=2048, dense_tiles=1)))])
def test_probe_builds_do_no_math_and_their_full_level_is_the_product(method, tmp_path):
    # A probe build leaves out the mma (and more), so its output is exactly zero without a bias: that
    # shows the define reached the kernel. Level "full" is the kernel itself, checked against fp64.
    from flashllm.bench import kernels as bench
    from flashllm.bench.probes import main, probe_configs

    fmt, options = bench.parse_format(method)
    cls, module = KERNELS[fmt]
    for m, k, n, s, split in ((130, 200, 17, 0.8, 1), (300, 520, 3, 0.5, 3)):
        w = random_weight(m, k, s, torch.float16)
        x = torch.randn(n, k, device="cuda", dtype=torch.float16)
        cfg = replace(configs.default_config(fmt, n, s), split_k=split, **options)
        for level, pcfg in probe_configs(fmt, cfg):
            y = module.linear(x, cls.from_dense(w), None, pcfg, out=torch.full((n, m), float("nan"), device="cuda",
                                                                              dtype=torch.float16))
            if pcfg.probe:
                assert bool((y == 0).all()), f"{method} {level}: a probe build computed something"
            else:
                ref = x.double() @ w.double().T
                assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    csv_path = tmp_path / "probes.csv"
    assert main(["--shapes", "tiny-a", "--n", "1,17", "--sparsity", "0.9", "--formats", method,
                 "--warmup", "1", "--rep", "3", "--csv", str(csv_path)]) == 0
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["level"] for r in rows[:len(probe_configs(fmt, cfg))]] == [lv for lv, _ in probe_configs(fmt, cfg)]
    full = [r for r in rows if r["level"] == "full"]
    assert len(full) == 2 and all(float(r["of_full"]) == 1.0 and float(r["err"]) < 1e-2 for r in full)
    assert all(float(r["time_us"]) > 0 and int(r["blocks_per_sm"]) >= 1 for r in rows)
