"""`flashllm bench kernels` plumbing on the CPU: shapes, table, CSV, plot (the timings are the
reference path's and mean nothing; the GPU run is scripts/device_check.sh)."""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import replace

import pytest
import torch

from flashllm.bench import kernels as bench


def parse(*argv: str):
    parser = bench.build_parser()
    return parser.parse_args(list(argv))


def test_issue_shapes_are_all_there():
    want = {(21504, 7168), (7168, 7168), (28672, 7168), (7168, 28672), (27648, 9216), (9216, 9216),
            (36864, 9216), (9216, 36864), (36864, 12288), (12288, 12288), (49152, 12288), (12288, 49152),
            (4096, 4096), (11008, 4096), (4096, 11008), (10240, 8192), (57344, 8192), (8192, 28672)}
    assert set(bench.ALL_SHAPES.values()) == want
    assert bench.DEFAULT_N == (1, 8, 16, 32, 64, 128)


def test_resolve_shapes():
    assert bench.resolve_shapes(["opt-66b.qkv"]) == [("opt-66b.qkv", 27648, 9216)]
    assert len(bench.resolve_shapes(["llama-2-7b"])) == 3
    assert len(bench.resolve_shapes(["all"])) == len(bench.ALL_SHAPES)
    assert bench.resolve_shapes(["100x200"]) == [("100x200", 100, 200)]
    with pytest.raises(ValueError, match="unknown shape"):
        bench.resolve_shapes(["gpt-5"])


def test_quick_preset_is_small():
    args = bench._finish_args(parse("--quick"))
    points = len(args.shapes) * len(args.n) * len(args.sparsity) * len(args.formats)
    assert points <= 100  # each a ~0.2 s do_bench: the preset must fit a few minutes of device time
    assert set(args.n) >= {1, 16} and 0.5 in args.sparsity and 0.8 in args.sparsity


def test_dry_run_writes_table_csv_and_plot(tmp_path, capsys):
    assert bench.main(parse("--dry-run", "--rep", "2", "--out", str(tmp_path))) == 0
    out = capsys.readouterr().out
    assert "x cuBLAS" in out and "geomean speedup" in out
    with open(tmp_path / "kernels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(bench.CSV_FIELDS) == set(rows[0])
    methods = {r["method"] for r in rows}
    assert {"dense", "bitmap (reference)", "tiled_csl (reference)", "csr"} <= methods
    for r in rows:
        assert r["gpu"] == "cpu" and r["date"] and r["torch"]
        assert float(r["time_us"]) > 0 and float(r["ideal"]) > 0
        assert float(r["err"]) < 1e-3  # every product agrees with the dense one
    bitmap = [r for r in rows if r["method"] == "bitmap (reference)"]
    assert {float(r["sparsity"]) for r in bitmap} == {0.5, 0.9}
    # the ideal is the byte ratio: more sparsity, more ideal speedup
    by_s = {float(r["sparsity"]): float(r["ideal"]) for r in bitmap if r["shape"] == "tiny-a" and r["n"] == "1"}
    assert by_s[0.9] > by_s[0.5] > 1
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "kernels_speedup.png").stat().st_size > 1000
    # a second run appends without repeating the header
    assert bench.main(parse("--dry-run", "--rep", "1", "--out", str(tmp_path), "--no-plot")) == 0
    with open(tmp_path / "kernels.csv", newline="") as fh:
        lines = fh.read().splitlines()
    assert sum(line.startswith("gpu,") for line in lines) == 1 and len(lines) == 2 * len(rows) + 1


def test_table_and_summary_format():
    rows = [bench.Row("l", 64, 64, 8, 0.0, "cublas", 10.0, 1.0, 1.0, 1000, 0.25, 0.0, "graph"),
            bench.Row("l", 64, 64, 8, 0.8, "bitmap", 5.0, 2.0, 3.8, 900, 0.2, 1e-4, "eager")]
    table = bench.format_table(rows)
    assert "bitmap" in table and "(eager)" in table and "2.00" in table
    assert "bitmap           s=0.80 N=8     2.00x  (1 layers)" in bench.summary(rows)
    assert "option vs default" not in bench.summary(rows)
    # an option's rows are compared with its format's, layer by layer
    rows.append(bench.Row("l", 64, 64, 8, 0.8, "bitmap:scatter", 4.0, 2.5, 3.8, 900, 0.2, 1e-4, "graph"))
    assert "bitmap:scatter   s=0.80 N=8     1.25x  (1 layers)" in bench.summary(rows).split("option vs default")[1]


def test_summary_compares_with_the_issue_targets():
    # geomean over N = 8, 16, 32 together (N = 1 and 64 do not count), against the fp16 targets
    rows = [bench.Row("l", 64, 64, n, 0.8, "bitmap", 1.0, speedup, 3.8, 900, 0.2, 1e-4, "graph")
            for n, speedup in ((1, 9.0), (8, 2.0), (16, 2.0), (32, 4.0), (64, 9.0))]
    rows.append(bench.Row("l", 64, 64, 16, 0.9, "tiled_csl", 1.0, 1.2, 5.0, 900, 0.2, 1e-4, "graph"))
    text = bench.summary(rows).split("against the kernel targets")[1]
    assert "bitmap           s=0.80  2.52x  (3 layer x N points)  target 2.30x: met" in text
    assert "tiled_csl        s=0.90  1.20x  (1 layer x N points)  target 2.50x: not met" in text


def test_tune_needs_a_gpu(capsys):
    assert parse("--tune", "--validated-only").validated_only
    assert bench.main(parse("--tune", "--device", "cpu", "--shapes", "64x64")) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_formats_accept_kernel_options():
    args = bench._finish_args(parse("--dry-run", "--formats", "bitmap,bitmap:scatter,tiled_csl,tiled_csl:warps8"))
    assert args.formats == ["bitmap", "bitmap:scatter", "tiled_csl", "tiled_csl:warps8"]
    assert bench.parse_format("tiled_csl:warps8") == ("tiled_csl", {"warps": 8})
    assert bench.parse_format("bitmap:scatter") == ("bitmap", {"decode": "scatter"})
    assert bench.parse_format("bitmap:fit") == ("bitmap", {"value_cap": bench.FIT})
    assert bench.parse_format("tiled_csl") == ("tiled_csl", {})
    assert bench.parse_format("tiled_csl:dense1") == ("tiled_csl", {"dense_tiles": 1})
    assert bench.parse_format("bitmap:fit:stages6") == ("bitmap", {"value_cap": bench.FIT, "stages": 6})
    assert bench.parse_format("tiled_csl:dense1:stages2") == ("tiled_csl", {"dense_tiles": 1, "stages": 2})
    assert bench.parse_format("bitmap:pf4") == ("bitmap", {"prefetch": 4})
    assert bench.parse_format("tiled_csl:split1") == ("tiled_csl", {"split_k": 1})
    for bad in ("tiled_csl:scatter", "tiled_csl:fit", "bitmap:warps8", "bitmap:gather", "bitmap:dense1", "csc",
                "csc:scatter", "bitmap:stages7", "tiled_csl:stages2", "bitmap:pf3", "bitmap:split3"):  # 2 stages need one dense tile
        with pytest.raises(ValueError, match="unknown format"):
            bench._finish_args(parse("--dry-run", "--formats", bad))


def test_skip_options_name_pending_options():
    assert bench._finish_args(parse("--dry-run", "--skip-options", "fit, prefetch")).skip_options == ["fit", "prefetch"]
    assert bench._finish_args(parse("--dry-run")).skip_options == []
    with pytest.raises(ValueError, match="unknown --skip-options"):
        bench._finish_args(parse("--dry-run", "--skip-options", "turbo"))


def test_tune_reports_each_option_tuned_on_its_own():
    from flashllm.kernels.configs import LaunchConfig

    timings = [(0.050, LaunchConfig(nrows=16, split_k=4)), (0.041, LaunchConfig(nrows=16, split_k=16)),
               (0.039, LaunchConfig(nrows=16, split_k=8, decode="scatter")),
               (0.060, LaunchConfig(nrows=16, split_k=16, decode="scatter")),
               (0.036, LaunchConfig(nrows=16, split_k=8, value_cap=bench.FIT))]
    assert bench._option_bests("bitmap", timings) == ("best per decode: fragment 36.0 us | scatter 39.0 us; "
                                                      "best per buffers: full 39.0 us | fit 36.0 us")
    csl = [(0.030, LaunchConfig(nrows=16, words_per_stage=2048)),
           (0.020, LaunchConfig(nrows=16, words_per_stage=2048, warps=8)),
           (0.025, LaunchConfig(nrows=16, words_per_stage=1024, dense_tiles=1))]
    assert bench._option_bests("tiled_csl", csl) == ("best per warps: 4 25.0 us | 8 20.0 us; "
                                                     "best per dense_tiles: 2 20.0 us | 1 25.0 us")


def test_tuning_never_times_a_wrong_candidate():
    import torch

    from flashllm.kernels import launch
    from flashllm.kernels.configs import LaunchConfig

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 96, generator=gen), torch.randn(40, 96, generator=gen)
    ref = x @ w.T
    right = (x.half().float() @ w.half().float().T).half()  # fp16 inputs and output: rounding only
    wrong = right.clone()
    wrong[3, 7] += 0.5 * ref.abs().max()  # one misplaced value
    nan = right.clone()
    nan[0, 0] = float("nan")
    assert launch.output_problem(right, ref) is None
    assert "max error" in launch.output_problem(wrong, ref)
    assert launch.output_problem(nan, ref) == "non-finite output"
    assert launch.output_problem(right.bfloat16(), ref) is None  # bf16 rounding is inside the bound too

    outputs = {2: wrong, 4: right, 8: nan}
    ms = {id(wrong): 1.0, id(right): 3.0, id(nan): 2.0}  # the wrong candidates would win on time
    cands = [LaunchConfig(nrows=16, split_k=s) for s in (2, 4, 8)]
    with pytest.warns(UserWarning, match="tuning skipped") as caught:
        best, best_ms, timings = launch.tune(lambda c: outputs[c.split_k], cands, timer=lambda fn: ms[id(fn())],
                                             check=lambda y: launch.output_problem(y, ref))
    assert best == cands[1] and best_ms == 3.0 and [c for _, c in timings] == [cands[1]]
    assert len(caught) == 2
    with pytest.warns(UserWarning), pytest.raises(launch.KernelUnavailable, match="correctly"):
        launch.tune(lambda c: wrong, cands, timer=lambda fn: 1.0, check=lambda y: launch.output_problem(y, ref))


def test_sample_times_a_random_subset(tmp_path):
    args = parse("--shapes", "opt-66b,llama-2-7b", "--n", "1,8,16", "--sparsity", "0.5,0.8", "--sample", "5")
    points = bench.sampled_points(bench._finish_args(args))
    assert len(points) == 5
    assert all(name.split(".")[0] in ("opt-66b", "llama-2-7b") and n in (1, 8, 16) and s in (0.5, 0.8)
               for name, n, s in points)
    again = bench.sampled_points(bench._finish_args(parse("--shapes", "opt-66b,llama-2-7b", "--n", "1,8,16",
                                                          "--sparsity", "0.5,0.8", "--sample", "5")))
    assert again == points  # the seed fixes the draw
    # in a run: only the sampled points are timed (the dry run has 4 points: N 1/8 x 0.5/0.9)
    assert bench.main(parse("--dry-run", "--rep", "1", "--sample", "2", "--out", str(tmp_path), "--no-plot")) == 0
    with open(tmp_path / "kernels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["method"] == "bitmap (reference)"]
    assert len(rows) == 2
    with pytest.raises(ValueError, match="--sample"):
        bench._finish_args(parse("--sample", "0"))


def test_bytes_in_flight_script_counts_each_pipelines_depth():
    # scripts/bytes_in_flight.py backs BENCHMARKS.md's latency argument; --regs needs no nvcc.
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bytes_in_flight.py"
    out = subprocess.run([sys.executable, str(script), "--regs", "64", "--nrows", "16", "--sparsity", "0.9"],
                         capture_output=True, text=True, check=True).stdout
    rows, ahead = {}, {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 11 and cells[0] in ("bitmap", "tiled_csl"):
            depth_cell, _, in_l2 = cells[8].partition(" + ")
            ahead[(cells[0], cells[3])] = int(in_l2.split()[0]) if in_l2 else 0
            rows[(cells[0], cells[3])] = [float(c) for c in cells[4:8] + [depth_cell] + cells[9:]]
    stages, smem, regs, blocks, depth, tile_kb, flight = rows[("tiled_csl", "shipped rule")]
    assert depth == stages - 1 and abs(flight - blocks * depth * tile_kb) <= 0.05 * blocks * depth + 0.5
    two = rows[("tiled_csl", "two dense tiles")]
    assert two[4] == two[0] - 2 and two[1] > smem  # one tile in flight less, 16 KB more
    assert rows[("bitmap", "fitted, 6 stages")][4] == 5
    for fmt in ("bitmap", "tiled_csl"):  # the L2 prefetch adds 4 whole tiles per block, no shared memory
        pf, shipped = rows[(fmt, "shipped + L2 prefetch 4")], rows[(fmt, "shipped rule")]
        assert ahead[(fmt, "shipped + L2 prefetch 4")] == 4 and pf[1] == shipped[1]
        assert pf[6] >= shipped[6] + 4 * pf[3] * pf[5] - 0.5
    assert all(r[6] > 0 for r in rows.values()) and len(rows) == 10


def test_appending_to_a_csv_of_an_older_version_keeps_its_columns(tmp_path, capsys):
    # A CSV begun before the sm_mhz column existed: new rows follow its header instead of shifting.
    path = tmp_path / "kernels.csv"
    old_fields = [f for f in bench.CSV_FIELDS if f != "sm_mhz"]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerow(old_fields)
    row = bench.Row(shape="tiny-a", out_features=192, in_features=256, n=1, sparsity=0.5, method="bitmap",
                    time_us=12.5, speedup=1.1, ideal=1.8, gbps=10.0, frac_copy=0.1, err=0.0, timing="graph",
                    config="cfg", sm_mhz=1980.0)
    env = {"gpu": "g", "date": "d", "torch": "t", "cuda": "c", "flashllm": "f", "copy_gbps": 4000.0,
           "flush": "write", "floor_us": 4.0}
    bench.write_csv([row], env, "fp16", str(path))
    assert "no column for sm_mhz" in capsys.readouterr().err
    got = list(csv.DictReader(open(path, newline="")))
    assert list(got[0]) == old_fields and got[0]["time_us"] == "12.5" and got[0]["config"] == "cfg"
    fresh = tmp_path / "new.csv"
    bench.write_csv([row], env, "fp16", str(fresh))
    assert list(csv.DictReader(open(fresh, newline="")))[0]["sm_mhz"] == "1980.0"


def test_configured_launch_is_the_librarys_choice_with_the_entrys_options(monkeypatch):
    # What `flashllm bench kernels` and the probes launch for a --formats entry (GPU-only there).
    from flashllm.formats import get_format
    from flashllm.kernels import configs

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    w = torch.randn(4096, 11008, dtype=torch.float16)
    w[torch.rand(w.shape) < 0.8] = 0
    for fmt in ("bitmap", "tiled_csl"):
        weight = get_format(fmt).from_dense(w)
        chosen = configs.get_config("sm90", fmt, 4096, 11008, 16, 0.8)
        assert bench.configured_launch(weight, 16, {}, torch.device("cpu")) == chosen
        _, options = bench.parse_format(f"{fmt}:fixup:pf4")
        assert bench.configured_launch(weight, 16, options, torch.device("cpu")) == \
            replace(chosen, fixup=True, prefetch=4)


def test_expand_adds_the_prefill_path_where_the_kernels_run(monkeypatch):
    # "<format>:expand" (expansion kernel + cuBLAS) beside each plain format, on the GPU only: the
    # CPU has no kernels, and its reference path is already decode + GEMM.
    from flashllm.kernels import bitmap_cuda, tiled_csl_cuda

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    w = torch.randn(100, 130, dtype=torch.float16)
    w[torch.rand(w.shape) < 0.7] = 0
    x = torch.randn(300, 130, dtype=torch.float16)
    names = [m.name for m in bench.sparse_methods(w, x, ["bitmap", "tiled_csl:warps8"], fast=True, expand=True)]
    assert names == ["bitmap", "bitmap:expand", "tiled_csl:warps8"]
    for module in (bitmap_cuda, tiled_csl_cuda):  # what the method calls: the real product, CPU-emulated
        monkeypatch.setattr(module, "expand", lambda weight: weight.to_dense())
    method = bench.sparse_methods(w, x, ["bitmap"], fast=True, expand=True)[1]
    torch.testing.assert_close(method.run().float(), (x.float() @ w.float().t()), rtol=1e-2, atol=1e-2)
    assert [m.name for m in bench.sparse_methods(w, x, ["bitmap"], fast=False, expand=True)] == ["bitmap (reference)"]
    assert bench.build_parser().parse_args(["--expand"]).expand


def test_cublas_fit_recovers_the_intercept_and_the_bandwidth():
    # times = 12 us + bytes at 4000 GB/s, for three layers of different sizes at N = 16
    rows = []
    for m, k in ((4096, 4096), (11008, 4096), (27648, 9216)):
        nbytes = 2 * (m * k + 16 * (m + k))
        time_us = 12.0 + nbytes / 4000e9 * 1e6
        rows.append(bench.Row("l", m, k, 16, 0.0, "cublas", time_us, 1.0, 1.0, nbytes / (time_us * 1e-6) / 1e9,
                              0.9, 0.0, "graph"))
    assert bench.cublas_fit_lines(rows) == ["cublas at N=16:  12.0 us + bytes at  4000 GB/s (least squares over 3 layers)"]
    assert bench.summary(rows).startswith("cublas at N=16:  12.0 us")
    assert bench.cublas_fit_lines(rows[:2]) == []  # two layers: no fit
    assert bench.cublas_fit_lines([replace(r, out_features=1) for r in rows[:1]] * 3) == []  # one size


def test_flush_modes_are_checked_and_recorded(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown L2 flush 'cold'"):
        bench._timer(torch.device("cpu"), 1, 1, "cold")
    with pytest.raises(SystemExit):
        parse("--flush", "cold")
    write, read = bench._flusher(torch.device("cpu"), "write"), bench._flusher(torch.device("cpu"), "read")
    assert write().abs().sum() == 0  # zeroes its buffer
    assert read().dim() == 0  # a sum: reads the buffer, writes one number
    csv_path = tmp_path / "k.csv"
    assert bench.main(parse("--dry-run", "--rep", "1", "--flush", "read", "--csv", str(csv_path), "--no-plot")) == 0
    assert "| L2 flush: read | floor " in capsys.readouterr().out
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["flush"] for r in rows} == {"read"}
    assert all(0 < float(r["floor_us"]) < 1e5 for r in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/device_check.sh runs it)")
@pytest.mark.parametrize("flush", bench.FLUSHES)
def test_event_timer_times_a_copy_after_either_flush(flush):
    device = torch.device("cuda")
    src = torch.randn(16 * 2**20, device=device)  # 64 MiB, more than an H100's or H200's L2
    dst = torch.empty_like(src)
    timer = bench._event_timer(device, 5, 20, bench._flusher(device, flush))
    ms = timer(lambda: dst.copy_(src))
    assert torch.equal(dst, src)
    # 128 MiB moved: between 100 GB/s and 20 TB/s on any GPU the kernels support
    assert 2 * src.numel() * 4 / 20e12 * 1e3 < ms < 2 * src.numel() * 4 / 100e9 * 1e3
    assert 0 < bench.timing_floor(device, timer) < ms


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/device_check.sh runs it)")
def test_chain_on_the_gpu_graphs_the_products_and_checks_the_first(tmp_path):
    # The kernels (and pdl where the GPU has it, unless the device script's smoke test dropped it)
    # four at a time in one graph: every row captured as a chain, every product right.
    import os

    from flashllm.kernels import configs

    formats = "bitmap,tiled_csl"
    if configs.pdl_capable(configs.arch_key(torch.cuda.get_device_capability())) and \
            "pdl" not in os.environ.get("FLASHLLM_SKIP_OPTIONS", "").split(","):
        formats += ",bitmap:pdl,tiled_csl:pdl"
    assert bench.main(parse("--shapes", "1000x2000", "--n", "1,16", "--sparsity", "0.8", "--formats", formats,
                            "--baselines", "cublas", "--chain", "4", "--warmup", "2", "--rep", "5",
                            "--out", str(tmp_path), "--no-plot")) == 0
    with open(tmp_path / "kernels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == {"cublas", *formats.split(",")}
    assert {r["timing"] for r in rows} == {"graph x 4"}
    assert all(float(r["err"]) < 1e-2 and 0 < float(r["time_us"]) < 1e4 for r in rows)


def test_device_check_presets_name_formats_that_parse():
    # A misspelt entry would cost a GPU session's benchmark step; every pending option is in the
    # diagnose preset's benchmark (its A/B) under at least one spelling.
    import re
    from pathlib import Path

    from flashllm.kernels import configs

    script = (Path(__file__).parents[1] / "scripts" / "device_check.sh").read_text()
    lists = re.findall(r'"\$\{(?:BENCH|PROBE)_FORMATS:=([^}]*)\}"', script)
    assert len(lists) >= 3
    for entries in lists:
        for name in entries.split(","):
            fmt, options = bench.parse_format(name)
            configs.example_config(fmt, options).validate(fmt)  # the options combine into a valid launch
    diagnose = lists[0].split(",")
    for option in configs.pending_options():
        if option in configs.PENDING_FORMATS:  # a pending kernel joins every benchmark once it passes its smoke test
            continue
        assert any(option in configs.unvalidated_options(configs.example_config(*bench.parse_format(n)))
                   for n in diagnose), option


def test_chain_times_back_to_back_products_and_reports_each(tmp_path, monkeypatch):
    # --chain K: each method runs over K weights of its own, one after the other, timed as one run
    # and reported per product ("x K" in the timing column); the library baselines stay single.
    calls = []
    real = bench.chained

    def counting(runs):
        calls.append(len(runs))
        return real(runs)

    monkeypatch.setattr(bench, "chained", counting)
    assert bench.main(parse("--dry-run", "--rep", "1", "--chain", "3", "--out", str(tmp_path), "--no-plot")) == 0
    with open(tmp_path / "kernels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["timing"] for r in rows if r["method"] != "csr"} == {"eager x 3"}
    assert {r["timing"] for r in rows if r["method"] == "csr"} == {"eager"}
    assert all(float(r["err"]) < 1e-3 for r in rows)  # the first product of each chain, checked
    assert calls and set(calls) == {3}
    # the chain runs every product, in order, and returns the last one's result
    order = []
    assert real([lambda i=i: order.append(i) or i for i in range(4)])() == 3 and order == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="--chain"):
        bench._finish_args(parse("--chain", "0"))


def test_bench_formats_reports_a_wrong_expansion_and_keeps_going(monkeypatch, capsys):
    # `flashllm bench formats` on a GPU checks each expansion kernel against to_dense: a wrong one
    # (as a kernel not yet run on a GPU could be) is reported on its row, the other rows still run,
    # and the exit status says so; --formats picks the formats.
    import argparse

    from flashllm.bench import formats as bench_formats

    def expander(device, dtype):
        def expand(name):
            if name == "tiled_csl16":
                return lambda packed: torch.zeros(packed.shape, dtype=packed.dtype)
            return lambda packed: packed.to_dense()
        return expand

    monkeypatch.setattr(bench_formats, "_expander", expander)
    parser = argparse.ArgumentParser()
    bench_formats.add_arguments(parser)
    args = parser.parse_args(["--shapes", "64x96", "--sparsities", "0.8", "--reps", "1", "--device", "cpu",
                              "--formats", "bitmap,tiled_csl,tiled_csl16"])
    assert bench_formats.main(args) == 1
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("| 64x96")]
    assert [row.split(" | ")[2] for row in rows] == ["bitmap", "tiled_csl", "tiled_csl16"]
    assert "WRONG" in rows[2] and "WRONG" not in rows[0] + rows[1]
    assert "tiled_csl16 expansion kernel disagrees" in err
    args = parser.parse_args(["--shapes", "64x96", "--sparsities", "0.8", "--reps", "1", "--device", "cpu"])
    assert bench_formats.main(args) == 0  # by default only the formats whose kernels have run on a GPU
