"""`python -m flashllm.bench.probes` on the CPU: its probe configurations, table and CSV, and the SM
clock sampler without a GPU (the GPU side is in test_kernels_cuda.py, run by device_check.sh)."""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flashllm.bench import probes
from flashllm.bench.clocks import SmClock, max_sm_clock
from flashllm.kernels import configs
from flashllm.kernels.configs import FIT, LaunchConfig

CUDA_SRC = Path(probes.__file__).resolve().parents[1] / "kernels" / "cuda"


@pytest.mark.parametrize("fmt,cfg", [("bitmap", LaunchConfig(nrows=16, value_cap=FIT, decode="scatter")),
                                     ("tiled_csl", LaunchConfig(nrows=8, words_per_stage=1024, warps=8))])
def test_probe_configs_change_only_the_probe(fmt, cfg):
    levels = probes.probe_configs(fmt, cfg)
    assert [lv for lv, _ in levels] == [lv for lv, _ in probes.LEVELS[fmt]] and levels[-1][0] == "full"
    resolved = cfg.fitted(1500)
    for level, pcfg in levels:
        # The launcher resolves fitted buffers with dataclasses.replace: the probe must survive it.
        fitted = pcfg.fitted(1500)
        assert isinstance(fitted, probes.ProbeConfig) and fitted.probe == pcfg.probe
        want = resolved.defines(fmt) | ({"FLASHLLM_PROBE": pcfg.probe} if pcfg.probe else {})
        assert fitted.defines(fmt) == want, level
        assert fitted.smem_bytes(fmt) == resolved.smem_bytes(fmt)  # same layout, same residency limit
        assert pcfg.validate(fmt) is pcfg


def test_probe_levels_match_what_the_kernels_accept():
    for fmt, source in (("bitmap", "bitmap_spmm.cu"), ("tiled_csl", "tiled_csl_spmm.cu")):
        text = (CUDA_SRC / source).read_text()
        top = int(re.search(r"FLASHLLM_PROBE >= 0 && FLASHLLM_PROBE <= (\d)", text).group(1))
        assert sorted(p for _, p in probes.LEVELS[fmt]) == list(range(top + 1)), fmt


def _rows():
    base = dict(shape="tiny-a", out_features=192, in_features=256, sparsity=0.8, method="bitmap",
                floor_us=1.0, cublas_us=4.0, blocks_per_sm=6, config="LaunchConfig(...)")
    rows = []
    for n, full in ((1, 8.0), (16, 10.0)):
        for level, t in (("stream", full / 2), ("scan", full * 0.6), ("decode", full * 0.9), ("full", full)):
            rows.append(probes.ProbeRow(n=n, level=level, time_us=t, of_full=t / full, sm_mhz=1980.0,
                                        err=0.0 if level == "full" else float("nan"), **base))
    return rows


def test_table_summary_and_csv(tmp_path):
    rows = _rows()
    line = probes.format_line(rows[:4])
    assert "stream  50% of full" in line and "full     8.0" in line and "MHz 1980/1980/1980/1980" in line
    text = probes.summary(rows)
    assert re.search(r"stream +50% +scan +60% +decode +90% +full 100%", text)
    env = {"gpu": "test", "date": "d", "torch": torch.__version__, "cuda": "none", "flashllm": "0",
           "copy_gbps": 4000.0, "max_sm_mhz": 1980}
    path = tmp_path / "probes.csv"
    probes.write_csv(rows, env, str(path))
    probes.write_csv(rows[:4], env, str(path))  # appends without a second header
    got = list(csv.DictReader(open(path)))
    assert len(got) == 12 and got[0]["gpu"] == "test" and got[3]["level"] == "full"
    assert float(got[0]["of_full"]) == 0.5 and got[0]["max_sm_mhz"] == "1980"


def test_cli_needs_cuda_and_names_bad_options(capsys):
    if not torch.cuda.is_available():
        assert probes.main(["--shapes", "tiny-a"]) == 2
        assert "need a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probes.main(["--formats", "bitmap:warps9"])
    assert "unknown format 'bitmap:warps9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probes.main(["--shapes", "gpt-9"])
    assert "unknown shape" in capsys.readouterr().err


def test_clock_sampler_without_a_gpu_reports_nothing():
    sampler = SmClock(torch.device("cpu"))
    with sampler:
        sum(range(1000))
    assert not sampler.available and sampler.median_mhz is None and sampler.samples == []
    assert max_sm_clock(torch.device("cpu")) is None


def test_unvalidated_options_stay_unvalidated_under_a_probe():
    pcfg = probes.probe_configs("tiled_csl", LaunchConfig(nrows=16, words_per_stage=1024, dense_tiles=1))[0][1]
    assert pcfg.validated() == replace(LaunchConfig(nrows=16, words_per_stage=1024, dense_tiles=1)).validated()
    assert pcfg.validated() is ("dense1" not in configs.UNVALIDATED)


def test_clock_sampler_collects_while_inside_and_stops_after(monkeypatch):
    # NVML is not on a CPU machine: a stand-in with the same two calls checks the sampling thread.
    from flashllm.bench import clocks

    class FakeNvml:
        def __init__(self):
            self.reads = 0

        def handle(self, device):
            return "gpu0"

        def clock(self, handle, max_clock=False):
            if max_clock:
                return 1980
            self.reads += 1
            return 1755 if self.reads % 2 else 1980

    fake = FakeNvml()
    monkeypatch.setattr(clocks, "_load", lambda: fake)
    sampler = SmClock(torch.device("cuda"), interval_s=0.001)
    assert sampler.available and max_sm_clock(torch.device("cuda")) == 1980
    import time

    with sampler:
        time.sleep(0.05)
    count = len(sampler.samples)
    assert count >= 3 and set(sampler.samples) <= {1755, 1980}
    assert sampler.median_mhz in (1755.0, 1980.0, (1755 + 1980) / 2)
    time.sleep(0.01)
    assert len(sampler.samples) == count  # the thread stopped at exit
    first = sampler.samples
    with sampler:  # reusable: a fresh set of samples
        time.sleep(0.01)
    assert sampler.samples is not first and len(sampler.samples) > 0 and len(first) == count


def test_stream_period_script_reads_a_probes_csv(tmp_path):
    # scripts/stream_period.py backs BENCHMARKS.md's per-tile period table: time x resident slots /
    # tiles, with the launch's automatic split resolved as the launcher does.
    script = _script("stream_period")
    row = {"shape": "l", "out_features": "11008", "in_features": "4096", "n": "16", "sparsity": "0.8",
           "method": "bitmap", "level": "stream", "time_us": "24.0", "blocks_per_sm": "6",
           "config": "LaunchConfig(nrows=16, strips=1, stages=3, split_k=8, value_cap=0, persistent=False)"}
    (got,) = script.period_rows([row, {**row, "level": "full"}], "stream")
    tiles = 172 * 64
    assert got["period_ns"] == pytest.approx(24.0e3 * 132 * 6 / tiles)
    assert got["tiles_per_block"] == 8 and got["waves"] == pytest.approx(172 * 8 / (132 * 6))
    assert got["kb_per_tile"] == pytest.approx(64 * 64 * (1 / 8 + 0.4) / 1024)
    stream_k = script.period_rows([{**row, "config": row["config"].replace("persistent=False", "persistent=True")}],
                                  "stream")[0]
    assert stream_k["waves"] == pytest.approx(1.0) and stream_k["tiles_per_block"] == pytest.approx(tiles / 792)


def test_crossover_estimate_adds_the_expansion_to_cublas():
    # scripts/crossover_estimate.py backs FLASHLLM_KERNEL_MAX_N: fused time over (expansion at a
    # fraction of copy bandwidth + cuBLAS's time at the same layer and N).
    script = _script("crossover_estimate")
    base = {"shape": "l", "out_features": "4096", "in_features": "2048", "n": "128", "copy_gbps": "4000.0"}
    rows = [{**base, "method": "cublas", "sparsity": "0.0", "time_us": "10.0", "ideal": "1.0"},
            {**base, "method": "bitmap", "sparsity": "0.8", "time_us": "30.0", "ideal": "3.8"},
            {**base, "method": "tiled_csl", "sparsity": "0.8", "time_us": "12.0", "ideal": "2.5"},
            {**base, "n": "64", "method": "bitmap", "sparsity": "0.8", "time_us": "5.0", "ideal": "3.8"}]  # no cuBLAS row
    got = script.ratios(rows, {"bitmap": 0.5, "tiled_csl": 1.0})
    dense = 2 * 4096 * 2048
    bitmap_us = (dense / 3.8 + dense) / (0.5 * 4000e9) * 1e6
    tiled_us = (dense / 2.5 + dense) / 4000e9 * 1e6
    assert set(got) == {(128, "bitmap", 0.8), (128, "tiled_csl", 0.8)}
    assert got[(128, "bitmap", 0.8)] == [pytest.approx(30.0 / (bitmap_us + 10.0))]
    assert got[(128, "tiled_csl", 0.8)] == [pytest.approx(12.0 / (tiled_us + 10.0))]


def test_sweep_fit_separates_fixed_cost_from_rate():
    # scripts/sweep_fit.py backs BENCHMARKS.md's fixed-cost / per-byte-rate table: a method whose
    # times lie on a line gets that line back, exactly.
    script = _script("sweep_fit")
    rows = [{"out_features": str(m), "in_features": "1000", "n": "8", "method": meth, "sparsity": s,
             "time_us": str(a + b * m * 1000 * 2 / 1e6)}
            for m in (1000, 3000, 7000) for meth, s, a, b in (("cublas", "0.0", 9.0, 0.25), ("bitmap", "0.8", 12.0, 0.2))]
    got = script.fits(rows)
    assert got[(8, "cublas", 0.0)] == pytest.approx((9.0, 0.25, 0.0), abs=1e-9)
    assert got[(8, "bitmap", 0.8)] == pytest.approx((12.0, 0.2, 0.0), abs=1e-9)


def _script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                                  /* 0x00000a0000017a02 */
        /*0010*/                   LDS.128 R8, [R45+0x3930] ;                              /* 0x0000000000007945 */
        /*0020*/                   POPC R26, R27 ;                                         /* 0x0000000000007945 */
        /*0030*/                   LDS.U16 R26, [R44] ;                                    /* 0x0000000000007945 */
        /*0040*/                   PRMT R26, R26, R11, R47 ;                               /* 0x0000000000007945 */
        /*0050*/                   NOP ;                                                   /* 0x0000000000007918 */
        /*0060*/              @!P1 BRA 0x30 ;                                              /* 0x0000000000007945 */
        /*0070*/                   HMMA.16816.F32 R12, R20.reuse, R26, R12 ;               /* 0x0000000000007945 */
        /*0080*/               @P4 BRA 0x10 ;                                              /* 0x0000000000007945 */
        /*0090*/                   EXIT ;                                                  /* 0x0000000000007945 */
        /*00a0*/                   BRA 0xa0;                                               /* 0x0000000000007945 */
"""


def test_sass_loops_script_counts_each_loop_by_kind():
    # scripts/sass_loops.py, the GPU-free proxy for an issue-bound kernel's loop (BENCHMARKS.md,
    # eleventh session): every backward branch is a loop, outermost first, NOPs not counted, and the
    # kernel's end marker (a branch to itself) is not a loop.
    script = _script("sass_loops")
    instructions = script.parse_sass(SASS)
    assert [op for _, op, _ in instructions][:3] == ["MOV", "LDS.128", "POPC"] and len(instructions) == 10
    outer, inner = script.loops(instructions)
    assert (outer.start, outer.end, outer.size) == (0x10, 0x80, 7)
    assert (inner.start, inner.end, inner.size) == (0x30, 0x60, 3)
    kinds = outer.kinds()
    assert kinds["shared load"] == 2 and kinds["tensor core"] == 1 and kinds["popcount/bits"] == 2
    assert kinds["branch"] == 2 and sum(kinds.values()) == outer.size
    # shared-memory round trips: the PRMT reads the LDS.U16's (and the LDS.128's) result, one wait
    assert outer.shared_waits() == 1 and inner.shared_waits() == 1
    waits = script.shared_waits
    # load-then-use, twice (the Tiled-CSL scatter before the sixteenth session): two round trips
    assert waits(["LDS.128", "LEA.HI", "STS.U16", "LDS.128", "LEA.HI", "STS.U16"],
                 ["R20, [R32]", "R24, R20, R29, RZ, 0x10", "[R24], R21",
                  "R20, [R32+0x800]", "R24, R20, R29, RZ, 0x10", "[R24], R21"]) == 2
    # both loads first, then their uses: one
    assert waits(["LDS.128", "LDS.128", "LEA.HI", "STS.U16", "LEA.HI", "STS.U16"],
                 ["R8, [R33]", "R12, [R33+0x800]", "R36, R8, UR7, RZ, 0x10", "[R36], R9",
                  "R37, R12, UR7, RZ, 0x10", "[R37], R13"]) == 1
    assert waits(["LDS.U16", "STS.U16"], ["R5, [R2]", "[R3], R5"]) == 1  # a store reads every operand
    assert waits(["LDSM.16.M88.4", "HMMA.16816.F32"], ["R24, [R35]", "R64, R48, R27, R64"]) == 1  # x4: R24-R27
    # a load into RZ, and a loaded register overwritten before any read, never wait
    assert waits(["LDS", "LDS.U16", "MOV", "IADD3"], ["RZ, [RZ]", "R4, [R2]", "R4, RZ", "R6, R4, 1, RZ"]) == 0
    from flashllm.kernels.configs import LaunchConfig

    assert script.weights_per_warp_iteration("bitmap", LaunchConfig(nrows=16, strips=2)) == 2048
    assert script.weights_per_warp_iteration("tiled_csl", LaunchConfig(nrows=16, warps=8)) == 1024
    # the main loop: the most tensor-core instructions, and of loops with as many the innermost (a
    # split-K fixup's retry branch can span the tile loop)
    assert script.find_main_loop([outer, inner]) is outer
    spanning = script.Loop(0x0, 0x90, ["BRA", *outer.opcodes, "ISETP"])
    assert script.find_main_loop([spanning, outer, inner]) is outer
    no_mma = [script.Loop(0x0, 0x40, ["FFMA"] * 6), script.Loop(0x10, 0x20, ["FFMA"] * 2)]
    assert script.find_main_loop(no_mma) is no_mma[0]  # the CUDA-core path: the largest loop
    # --base reads the kernel sources of a git revision
    assert "flashllm_tiled_csl_spmm" in script.git_show("HEAD", "tiled_csl_spmm.cu")


def test_csl_scatter_conflicts_counts_wavefronts_of_both_layouts():
    # scripts/csl_scatter_conflicts.py backs the Tiled-CSL layout-2 numbers in docs/kernels.md.
    script = _script("csl_scatter_conflicts")
    # One tile of 256 words: lanes storing 32 distinct banks take one wavefront per store, the same
    # bank (distinct words) one per word, two halves of one word one.
    words = torch.arange(256, dtype=torch.int64)  # word 4l + c: bank (4l + c) % 32
    offsets = torch.tensor([0, 256])
    wavefronts, stores = script.store_wavefronts(words, offsets)
    assert stores == 8 and wavefronts == 8 * 4  # lanes l and l + 8 share a bank: 4 per store
    same = torch.full((128,), 5, dtype=torch.int64)
    assert script.store_wavefronts(same, torch.tensor([0, 128])) == (4, 4)
    # Random weights: version 2's order is near one wavefront, version 1's about three.
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(256, 128, generator=gen)
    dense[torch.rand(256, 128, generator=gen) < 0.8] = 0
    from flashllm.formats.tiled_csl import TiledCSLWeight, split_words

    weight = TiledCSLWeight.from_dense(dense.half())
    slots = split_words(weight.words, torch.float16)[1]
    v1 = script.location_ordered(slots, weight.offsets)
    assert sorted(v1.tolist()) == sorted(slots.tolist())
    now, stores = script.store_wavefronts(slots >> 2, weight.offsets)
    before, _ = script.store_wavefronts(v1 >> 2, weight.offsets)
    assert now < before and now / stores < 1.7 < before / stores


def test_compare_sweeps_reports_ratios_net_of_cublas(tmp_path):
    # scripts/compare_sweeps.py, run by the device script after its sweep: old / new time per method,
    # by sparsity and by N, and the same divided by cuBLAS's ratio at that (dtype, shape, N).
    script = _script("compare_sweeps")
    fields = "dtype,shape,n,sparsity,method,time_us"

    def write(name, rows):
        path = tmp_path / name
        path.write_text(fields + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
        return str(path)

    old = write("old.csv", [("fp16", "a", 1, 0.0, "cublas", 10.0), ("fp16", "a", 1, 0.8, "bitmap", 8.0),
                            ("fp16", "a", 8, 0.0, "cublas", 12.0), ("fp16", "a", 8, 0.8, "bitmap", 9.0),
                            ("fp16", "b", 1, 0.8, "bitmap", 5.0)])  # b: not in the new run
    new = write("new.csv", [("fp16", "a", 1, 0.0, "cublas", 11.0), ("fp16", "a", 1, 0.8, "bitmap", 4.0),
                            ("fp16", "a", 8, 0.0, "cublas", 12.0), ("fp16", "a", 8, 0.8, "bitmap", 9.0),
                            ("fp16", "a", 8, 0.8, "tiled_csl", "")])  # no time: skipped
    lines = script.compare(script.read(old), script.read(new))
    assert lines[0] == "4 points in both runs"
    assert lines[1].startswith(f"cublas: old / new time {(10 / 11) ** 0.5:.3f} over 2 points")
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line for line in lines[4:]}
    # N = 1: twice as fast (8 -> 4 µs) while cuBLAS got 10% slower: net 2 / (10 / 11) = 2.2
    assert rows[("bitmap", "N", "1")].endswith("| 1 | 2.000 | 2.200 |")
    assert rows[("bitmap", "N", "8")].endswith("| 1 | 1.000 | 1.000 |")
    assert rows[("bitmap", "sparsity", "80%")].endswith(f"| 2 | {2 ** 0.5:.3f} | {2.2 ** 0.5:.3f} |")
    assert script.compare({}, script.read(new)) == ["no point is in both runs"]


def test_register_check_counts_resident_blocks_and_reads_ptxas():
    # scripts/register_check.py: a kernel edit's register changes that cost a resident block per SM
    script = _script("register_check")
    # 8 warps at 64 registers: 4 blocks by registers (64K / (256 x 64)); 60 KB of shared memory: 3 on sm_90
    assert script.resident_blocks(64, 256, 0, "sm_90") == 4
    assert script.resident_blocks(72, 256, 0, "sm_90") == 3  # 4 x 256 x 72 registers exceed 64K
    assert script.resident_blocks(64, 256, 60 * 1024, "sm_90") == 3
    assert script.resident_blocks(65, 128, 0, "sm_90") == 7  # rounded up to 72 per thread, per warp
    assert script.resident_blocks(40, 128, 12 * 1024, "sm_80") == 12
    assert script.resident_blocks(16, 32, 0, "sm_90") == 32  # the block limit
    log = "ptxas info : Used 92 registers, used 1 barriers, 16 bytes stack frame, 20 bytes spill stores, 8 bytes spill loads"
    assert script.ptxas_report(log) == (92, 16, 20)
    assert script.ptxas_report("no report") == (-1, -1, -1)
    # scripts/nvrtc_check.py reads every kernel of a module's report (register_check the first)
    two = log + "\nptxas info : Used 40 registers, 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
    assert _script("nvrtc_check").ptxas_numbers(two) == ([92, 40], [16, 0], [20, 0])
