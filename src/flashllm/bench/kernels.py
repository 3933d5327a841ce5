"""`flashllm bench kernels`: the sparse kernels against dense cuBLAS, cuSPARSE CSR and torch's 2:4
path, on real layer shapes, in one process, with the byte-count ideal next to every speedup.

    python -m flashllm.bench.kernels --quick                      # a few minutes of GPU time
    python -m flashllm.bench.kernels --shapes opt-66b --n 1,16 --sparsity 0.5,0.8
    python -m flashllm.bench.kernels --tune --shapes llama-2-7b --write-configs tuned.json
    python -m flashllm.bench.kernels --dry-run                    # CPU: exercises the plumbing only

Method (docs/kernels.md): times are medians of CUDA-event timings (triton.testing.do_bench, L2
flushed before every run). cuBLAS and flashllm are timed as CUDA-graph replays, so Python launch
overhead is out of the numbers (as in graph-captured decoding); cuSPARSE and 2:4, far slower, are
timed eagerly, as is anything whose capture fails (marked "eager"). Weights are random normals with random zeros at the target sparsity
(never all-zero data); activations are random normals. "ideal" is dense bytes / stored bytes;
"GB/s" counts the stored weight plus activations and output once; "copy" is that rate as a
fraction of a device-to-device copy measured in the same run. Every sparse result is checked
against cuBLAS's before it is timed ("err" column). "sm_mhz" is the SM clock NVML read while each
was timed (bench/clocks.py): a time is only comparable with another at the same clock. `--chain
K` times K back-to-back products (each with its own weight) as one graph, L2 flushed before it,
and reports the time per product: what a product costs between neighbours, as in a decode step,
rather than after the timer's event. Where the time goes inside a kernel: `python -m
flashllm.bench.probes`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..kernels.configs import FIT, PENDING_FORMATS, PENDING_NAMES, LaunchConfig, parse_options
from ..kernels.launch import flushed_times, l2_flusher
from .clocks import SmClock, max_sm_clock
from .csvlog import append_rows

# (name, out_features M, in_features K), grouped by model.
SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "opt-30b": [("opt-30b.qkv", 21504, 7168), ("opt-30b.out", 7168, 7168),
                ("opt-30b.fc1", 28672, 7168), ("opt-30b.fc2", 7168, 28672)],
    "opt-66b": [("opt-66b.qkv", 27648, 9216), ("opt-66b.out", 9216, 9216),
                ("opt-66b.fc1", 36864, 9216), ("opt-66b.fc2", 9216, 36864)],
    "opt-175b": [("opt-175b.qkv", 36864, 12288), ("opt-175b.out", 12288, 12288),
                 ("opt-175b.fc1", 49152, 12288), ("opt-175b.fc2", 12288, 49152)],
    "llama-2-7b": [("llama-2-7b.attn", 4096, 4096), ("llama-2-7b.up", 11008, 4096),
                   ("llama-2-7b.down", 4096, 11008)],
    "llama-3-70b": [("llama-3-70b.qkv", 10240, 8192), ("llama-3-70b.gate_up", 57344, 8192),
                    ("llama-3-70b.down", 8192, 28672)],
}
ALL_SHAPES = {name: (m, k) for group in SHAPES.values() for name, m, k in group}
DEFAULT_N = (1, 8, 16, 32, 64, 128)
DEFAULT_SPARSITY = (0.5, 0.6, 0.7, 0.8, 0.9)
FORMATS = ("bitmap", "tiled_csl", "tiled_csl16")
# What --formats times unless told: the kernels validated on a GPU (a pending format's is asked for by name).
DEFAULT_FORMATS = tuple(f for f in FORMATS if f not in PENDING_FORMATS)
BASELINES = ("cublas", "csr", "2:4")
QUICK = {
    "shapes": ["opt-66b.qkv", "opt-66b.out", "llama-3-70b.down", "llama-2-7b.up"],
    "n": [1, 16, 64],
    "sparsity": [0.5, 0.7, 0.8, 0.9],
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The kernel issue's targets: speedup over cuBLAS in fp16, geomean over the layers at N = 8, 16, 32.
TARGET_N = (8, 16, 32)
TARGETS = {"bitmap": {0.5: 1.25, 0.7: 1.8, 0.8: 2.3}, "tiled_csl": {0.7: 1.4, 0.8: 1.8, 0.9: 2.5}}
TARGETS["tiled_csl16"] = TARGETS["tiled_csl"]  # the same bytes per weight, so the same targets
DRY_RUN = {"shapes": ["tiny-a"], "n": [1, 8], "sparsity": [0.5, 0.9]}
_TINY = {"tiny-a": (192, 256), "tiny-b": (256, 320)}


@dataclass
class Row:
    shape: str
    out_features: int
    in_features: int
    n: int
    sparsity: float
    method: str
    time_us: float
    speedup: float  # over cuBLAS in the same run
    ideal: float  # dense bytes / stored bytes
    gbps: float  # (stored weight + x + y) bytes / time
    frac_copy: float  # gbps / measured copy bandwidth
    err: float  # relative error against cuBLAS's result (0 for cuBLAS itself)
    timing: str  # "graph", "graph x K" (a chain of K products, `--chain`; time_us per product) or "eager"
    config: str = ""
    sm_mhz: float = float("nan")  # median SM clock while timed (NVML; nan without it)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
# The L2 flush before each timed call. "write" zeroes a 256 MiB buffer, as triton's do_bench does,
# which leaves the L2 full of dirty lines: the timed call's own reads must then evict them, so its
# time includes writing up to an L2's worth of bytes (50 MB on an H100 or H200) back to DRAM. That
# costs a kernel at copy bandwidth and not one with bandwidth to spare: measured on an H200
# (BENCHMARKS.md, eleventh session), cuBLAS's intercept over the 18 issue layers fell from 15.2 to
# 8.7 us and its time on the largest by 22 us (247 -> 226 us, 90% -> 97% of copy bandwidth) under
# "read", the flashllm kernels' by 0-2 us: the write flush inflated every speedup. "read" (the
# default since) sums the same buffer instead: the weight leaves the L2 all the same, and the lines
# left behind are clean, as they are between the layers of a decode step, whose weights are only
# read.
FLUSHES = ("write", "read")
FLUSH_BYTES = 256 * 2**20


def _flusher(device: torch.device, flush: str) -> Callable[[], object]:
    return l2_flusher(device, flush, FLUSH_BYTES)


def _event_timer(device: torch.device, warmup_ms: int, rep_ms: int, flush: Callable[[], object]):
    """do_bench's procedure with our own flush: five flushed calls estimate a call's time, which sets
    how many warm-up calls and timed calls fit in `warmup_ms` and `rep_ms`; every timed call follows
    a flush and sits between two CUDA events, all enqueued before one synchronization; the median."""
    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize(device)
        begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(5):
            flush()
            fn()
        finish.record()
        torch.cuda.synchronize(device)
        estimate = max(begin.elapsed_time(finish) / 5, 1e-3)
        for _ in range(max(1, int(warmup_ms / estimate))):
            fn()
        return statistics.median(flushed_times(fn, flush, max(1, int(rep_ms / estimate)), device))
    return timed


def _timer(device: torch.device, warmup_ms: int, rep_ms: int,
           flush: str = "read") -> Callable[[Callable[[], object]], float]:
    """A function returning the median milliseconds of a callable on `device`, each call after an
    L2 flush of kind `flush` (FLUSHES; triton's do_bench itself for "write" when triton is there)."""
    if flush not in FLUSHES:
        raise ValueError(f"unknown L2 flush {flush!r}; choose from {', '.join(FLUSHES)}")
    if device.type != "cuda":
        def cpu_time(fn):
            fn()
            times = []
            deadline = time.perf_counter() + rep_ms / 1000
            while not times or (time.perf_counter() < deadline and len(times) < 1000):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
            return statistics.median(times)
        return cpu_time
    if flush == "write":
        try:
            from triton.testing import do_bench

            return lambda fn: float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except ImportError:
            pass
    return _event_timer(device, warmup_ms, rep_ms, _flusher(device, flush))


def _graphed(fn: Callable[[], object], device: torch.device) -> tuple[Callable[[], object], str]:
    """`fn` captured in a CUDA graph (after warm-up), or `fn` itself if it cannot be captured."""
    if device.type != "cuda":
        return fn, "eager"
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, "graph"
    except Exception:  # noqa: BLE001 - any capture failure just means eager timing
        torch.cuda.synchronize(device)
        return fn, "eager"


Timed = Callable[[Callable[[], object]], tuple[float, float]]


def start_run(device: torch.device, warmup_ms: int, rep_ms: int, flush: str = "read") -> tuple[Timed, dict]:
    """A run's timer, `timed(fn)` -> (median ms, median SM clock in MHz while timed, nan without
    NVML), and its environment (GPU, versions, date, measured copy bandwidth, maximum SM clock, the
    L2 flush and the timing floor: a one-element kernel's time, what any call pays here), printed
    as the run's header line."""
    timer = _timer(device, warmup_ms, rep_ms, flush)
    clock = SmClock(device)
    env = environment(device)
    env["copy_gbps"] = copy_bandwidth(device, timer)
    env["max_sm_mhz"] = max_sm_clock(device)
    env["flush"] = flush
    env["floor_us"] = timing_floor(device, timer) * 1e3
    print(f"# {env['gpu']} | torch {env['torch']} | CUDA {env['cuda']} | copy {env['copy_gbps']:.0f} GB/s "
          f"| max SM clock {env['max_sm_mhz'] or 'n/a'} MHz | L2 flush: {flush} | floor {env['floor_us']:.1f} us "
          f"| {env['date']}", flush=True)

    def timed(fn) -> tuple[float, float]:
        with clock:
            ms = timer(fn)
        return ms, clock.median_mhz or float("nan")

    return timed, env


def timing_floor(device: torch.device, timer) -> float:
    """Milliseconds the timer gives a one-element kernel, replayed from a CUDA graph like every
    timed product: the part of each time that is neither bytes nor work (events, graph launch)."""
    one = torch.zeros(1, device=device)
    return timer(_graphed(lambda: one.add_(1), device)[0])


def copy_bandwidth(device: torch.device, timer) -> float:
    """GB/s of a large device-to-device copy, bytes read plus bytes written."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------
def random_pruned(m: int, k: int, sparsity: float, dtype: torch.dtype, device: torch.device,
                  gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(m, k, device=device, dtype=torch.float32, generator=gen)
    w[torch.rand(m, k, device=device, generator=gen) < sparsity] = 0
    return w.to(dtype)


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive weights in a row (torch's semi-structured pattern)."""
    groups = w.reshape(-1, 4)
    keep = groups.abs().argsort(dim=1, descending=True)[:, :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(w.shape)


@dataclass
class Method:
    name: str
    run: Callable[[], torch.Tensor]
    stored_bytes: int
    config: str = ""
    capture: bool = True  # time graph replays; library baselines that may not capture run eagerly


def configured_launch(weight, n: int, options: dict, device: torch.device) -> LaunchConfig:
    """The launch the library picks for `weight` at `n` activation rows on `device`, with a
    --formats entry's `options` (a `parse_format` result) forced on it: e.g. "bitmap:scatter" is
    the chosen launch with the other decode, for an A/B."""
    from ..kernels import configs, cuda_module

    tensors = list(weight.tensors().values())
    sparsity = cuda_module(weight.name).KERNEL.sparsity_of(tensors, *weight.shape)
    cfg = configs.get_config(configs.arch_key(torch.cuda.get_device_capability(device)), weight.name,
                             *weight.shape, n, sparsity)
    return configs.with_options(cfg, options, weight.name) if options else cfg


def sparse_methods(w: torch.Tensor, x: torch.Tensor, formats: list[str], fast: bool,
                   expand: bool = False) -> list[Method]:
    """flashllm's formats: the CUDA kernels when `fast`, otherwise the reference path (`spmm`).
    With `expand`, each format without options also as "<format>:expand": its expansion kernel then
    cuBLAS, the prefill path (`configs.expand_enabled`), timed against the fused kernel."""
    from ..formats import get_format
    from ..kernels.spmm import reference_linear

    out = []
    for name in formats:
        fmt, options = parse_format(name)
        if options.get("cores") and x.shape[0] > 1:  # the CUDA-core path multiplies one row
            continue
        weight = get_format(fmt).from_dense(w)
        if fast:
            from ..kernels import cuda_module

            cfg = configured_launch(weight, x.shape[0], options, x.device)
            out.append(Method(name, lambda m=cuda_module(fmt), wt=weight, c=cfg: m.linear(x, wt, None, c),
                              weight.nbytes, str(cfg)))
            if expand and not options:
                out.append(Method(f"{fmt}:expand", lambda m=cuda_module(fmt), wt=weight: F.linear(x, m.expand(wt)),
                                  weight.nbytes, "expansion kernel + cuBLAS"))
        elif not options:  # the reference path has no kernel options to compare
            # The reference path itself, even where `spmm` would pick a registered kernel.
            out.append(Method(f"{fmt} (reference)", lambda wt=weight: reference_linear(
                x, list(wt.tensors().values()), wt.format_code, *wt.shape, None), weight.nbytes))
    return out


def parse_format(name: str) -> tuple[str, dict]:
    """"tiled_csl:warps8" -> ("tiled_csl", {"warps": 8}): a format and launch options that override
    the chosen configuration (configs.OPTION_SPELLINGS: "bitmap:scatter", "tiled_csl:dense1", "pf4",
    "fixup", ...; several combine, as in "bitmap:fit:stages6")."""
    fmt, *opts = name.split(":")
    try:
        if fmt not in FORMATS:
            raise ValueError(f"formats are {FORMATS}")
        return fmt, parse_options(fmt, opts)
    except ValueError as err:
        raise ValueError(f"unknown format {name!r}: {err}") from None


def baseline_methods(w: torch.Tensor, x: torch.Tensor, baselines: list[str], sparsity: float) -> list[Method]:
    out = []
    if "csr" in baselines:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            csr = w.to_sparse_csr()
        nbytes = sum(t.numel() * t.element_size() for t in (csr.values(), csr.col_indices(), csr.crow_indices()))
        xt = x.t().contiguous()
        out.append(Method("cusparse-csr" if w.is_cuda else "csr", lambda: torch.mm(csr, xt).t(), nbytes,
                          capture=False))
    if "2:4" in baselines and w.is_cuda and abs(sparsity - 0.5) < 1e-9:
        try:
            from torch.sparse import to_sparse_semi_structured

            semi = to_sparse_semi_structured(prune_2_4(w))
            nbytes = w.numel() * w.element_size() // 2 + w.numel() // 8
            out.append(Method("torch-2:4", lambda: F.linear(x, semi), nbytes, capture=False))
        except Exception as exc:  # noqa: BLE001 - unavailable on this GPU / torch: say so, go on
            print(f"  (2:4 baseline unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _parse_list(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def resolve_shapes(spec: list[str]) -> list[tuple[str, int, int]]:
    out = []
    for item in spec:
        if item == "all":
            out += [(n, m, k) for n, (m, k) in ALL_SHAPES.items()]
        elif item in SHAPES:
            out += SHAPES[item]
        elif item in ALL_SHAPES:
            out.append((item, *ALL_SHAPES[item]))
        elif item in _TINY:
            out.append((item, *_TINY[item]))
        elif "x" in item:
            m, k = (int(v) for v in item.lower().split("x"))
            out.append((item, m, k))
        else:
            raise ValueError(f"unknown shape {item!r}: use a model ({', '.join(SHAPES)}), a layer "
                             f"({', '.join(ALL_SHAPES)}), 'all' or MxK")
    return out


def environment(device: torch.device) -> dict:
    from .. import __version__

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "gpu": gpu,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "flashllm": __version__,
    }


def chained(runs: list[Callable[[], torch.Tensor]]) -> Callable[[], torch.Tensor]:
    """The products `runs` one after the other on the stream (each with its own weight): `--chain`
    times them as one graph, a decode step's back-to-back products instead of one product after an
    event, so the time per product is what a kernel costs between neighbours (the overlap of
    programmatic dependent launch, `pdl`, included) rather than after the timer's event."""
    def run() -> torch.Tensor:
        for fn in runs[:-1]:
            fn()
        return runs[-1]()
    return run


def sampled_points(args) -> set[tuple[str, int, float]]:
    """The (layer, N, sparsity) points to time: all of them, or `--sample` of them drawn with
    `--seed` (so a sweep over every issue shape fits a short GPU session)."""
    points = [(name, n, s) for name, _, _ in resolve_shapes(args.shapes) for n in args.n for s in args.sparsity]
    if args.sample is not None and args.sample < len(points):
        points = random.Random(args.seed).sample(points, args.sample)
    return set(points)


def run(args) -> tuple[list[Row], dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    fast = device.type == "cuda" and not args.reference and dtype != torch.float32
    timed, env = start_run(device, args.warmup, args.rep, args.flush)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows: list[Row] = []
    points = sampled_points(args)
    for name, m, k in resolve_shapes(args.shapes):
        for n in args.n:
            if not any((name, n, s) in points for s in args.sparsity):
                continue
            x = torch.randn(n, k, device=device, dtype=dtype, generator=gen)
            dense_ws = [random_pruned(m, k, 0.0, dtype, device, gen) for _ in range(args.chain)]
            dense_bytes = m * k * dtype.itemsize
            io_bytes = (n * k + n * m) * dtype.itemsize
            ref_fn, ref_mode = _graphed(chained([lambda x=x, w=w: F.linear(x, w) for w in dense_ws]), device)
            dense_ms, dense_mhz = timed(ref_fn)
            dense_ms, ref_mode = _per_product(dense_ms, ref_mode, args.chain)
            del ref_fn
            base = dict(shape=name, out_features=m, in_features=k, n=n)
            if "cublas" in args.baselines:
                gbps = (dense_bytes + io_bytes) / (dense_ms * 1e-3) / 1e9
                rows.append(Row(**base, sparsity=0.0, method="cublas" if device.type == "cuda" else "dense",
                                time_us=dense_ms * 1e3, speedup=1.0, ideal=1.0, gbps=gbps,
                                frac_copy=gbps / env["copy_gbps"], err=0.0, timing=ref_mode, sm_mhz=dense_mhz))
            del dense_ws
            for s in args.sparsity:
                if (name, n, s) not in points:
                    continue
                w = random_pruned(m, k, s, dtype, device, gen)
                expected = F.linear(x, w).float()
                methods = sparse_methods(w, x, args.formats, fast, args.expand) + baseline_methods(w, x, args.baselines, s)
                # --chain: the same methods over chain - 1 more weights, run after the first in one graph
                more = [sparse_methods(random_pruned(m, k, s, dtype, device, gen), x, args.formats, fast, args.expand)
                        for _ in range(args.chain - 1)]
                for j, method in enumerate(methods):
                    try:
                        got = method.run().float()
                        err = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
                        if not method.capture:  # the library baselines (after the sparse methods): one product
                            fn, mode, count = method.run, "eager", 1
                        else:
                            runs = [method.run, *(group[j].run for group in more)]
                            fn, mode = _graphed(chained(runs), device)
                            count = len(runs)
                        ms, mhz = timed(fn)
                        ms, mode = _per_product(ms, mode, count)
                    except Exception as exc:  # noqa: BLE001 - report and continue the sweep
                        print(f"  {name} N={n} s={s} {method.name}: FAILED {type(exc).__name__}: {exc}",
                              file=sys.stderr, flush=True)
                        continue
                    gbps = (method.stored_bytes + io_bytes) / (ms * 1e-3) / 1e9
                    rows.append(Row(**base, sparsity=s, method=method.name, time_us=ms * 1e3,
                                    speedup=dense_ms / ms, ideal=dense_bytes / method.stored_bytes, gbps=gbps,
                                    frac_copy=gbps / env["copy_gbps"], err=err, timing=mode, config=method.config,
                                    sm_mhz=mhz))
                    print(f"  {name:20s} N={n:<4d} s={s:.2f} {method.name:16s} {ms * 1e3:9.1f} us "
                          f"{dense_ms / ms:5.2f}x (ideal {dense_bytes / method.stored_bytes:4.2f}) err {err:.1e}"
                          + ("" if mhz != mhz else f" @ {mhz:.0f} MHz"), flush=True)
                del w, expected, methods, more
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, env


# ---------------------------------------------------------------------------------------------
# Output: table, CSV, plot
# ---------------------------------------------------------------------------------------------
def _per_product(ms: float, mode: str, count: int) -> tuple[float, str]:
    """A chain's time per product, and its timing label ("graph x 4")."""
    return ms / count, mode if count == 1 else f"{mode} x {count}"


def format_table(rows: list[Row]) -> str:
    head = f"{'layer':20s} {'M':>6s} {'K':>6s} {'N':>4s} {'spars':>5s} {'method':16s} {'time us':>9s} " \
           f"{'x cuBLAS':>8s} {'ideal':>5s} {'GB/s':>6s} {'copy':>5s} {'err':>7s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.shape:20s} {r.out_features:6d} {r.in_features:6d} {r.n:4d} {r.sparsity:5.2f} {r.method:16s} "
            f"{r.time_us:9.1f} {r.speedup:8.2f} {r.ideal:5.2f} {r.gbps:6.0f} {r.frac_copy:5.0%} {r.err:7.1e}"
            + ("" if r.timing == "graph" else f" ({r.timing})")
        )
    return "\n".join(lines)


def cublas_fit_lines(rows: list[Row]) -> list[str]:
    """Per N, cuBLAS's times (on the CPU: the dense product's) fitted as intercept + bytes /
    bandwidth, least squares over the layers: the intercept is what every call pays in this
    harness besides its bytes, the bandwidth what its bytes cost at the margin. Needs three layers
    of two sizes or more."""
    lines = []
    for n in sorted({r.n for r in rows}):
        dense = [r for r in rows if r.n == n and r.method in ("cublas", "dense")]  # "dense": on the CPU
        pts = [(r.gbps * r.time_us * 1e3, r.time_us) for r in dense]
        if len(pts) < 3 or len({b for b, _ in pts}) < 2:
            continue
        slope, intercept = statistics.linear_regression(*zip(*pts))
        if slope <= 0:
            continue
        lines.append(f"{dense[0].method} at N={n}: {intercept:5.1f} us + bytes at "
                     f"{1e-3 / slope:5.0f} GB/s (least squares over {len(pts)} layers)")
    return lines


def summary(rows: list[Row]) -> str:
    """Geometric-mean speedup over cuBLAS per method, sparsity and N: the numbers the targets name."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r.method in ("cublas", "dense"):
            continue
        groups.setdefault((r.method, r.sparsity, r.n), []).append(r.speedup)
    geomean = statistics.geometric_mean
    lines = cublas_fit_lines(rows) + ["geomean speedup over cuBLAS (all layers):"]
    for (method, s, n), vals in sorted(groups.items()):
        lines.append(f"  {method:16s} s={s:.2f} N={n:<4d} {geomean(vals):5.2f}x  ({len(vals)} layers)")
    # The measure: the geomean over every layer at N = 8, 16 and 32 together.
    target_rows: dict[tuple, list[float]] = {}
    for (method, s, n), vals in groups.items():
        if n in TARGET_N:
            target_rows.setdefault((method, s), []).extend(vals)
    if target_rows:
        lines.append(f"against the kernel targets (geomean over N = {', '.join(map(str, TARGET_N))}, fp16 targets):")
        for (method, s), vals in sorted(target_rows.items()):
            g, target = geomean(vals), TARGETS.get(method, {}).get(round(s, 2))
            verdict = "" if target is None else f"  target {target:.2f}x: {'met' if g >= target else 'not met'}"
            lines.append(f"  {method:16s} s={s:.2f} {g:5.2f}x  ({len(vals)} layer x N points){verdict}")
    # A/B of kernel options ("bitmap:scatter" against "bitmap"), layer by layer in the same run.
    per_layer = {(r.method, r.shape, r.sparsity, r.n): r.speedup for r in rows}
    ab: dict[tuple, list[float]] = {}
    for (method, shape, s, n), speedup in per_layer.items():
        base = method.split(":")[0]
        if ":" in method and (base, shape, s, n) in per_layer:
            ab.setdefault((method, s, n), []).append(speedup / per_layer[(base, shape, s, n)])
    if ab:
        lines.append("option vs default (geomean time ratio default / option, >1: the option is faster):")
        for (method, s, n), vals in sorted(ab.items()):
            lines.append(f"  {method:16s} s={s:.2f} N={n:<4d} {geomean(vals):5.2f}x  ({len(vals)} layers)")
    return "\n".join(lines)


CSV_FIELDS = ["gpu", "date", "torch", "cuda", "flashllm", "dtype", "shape", "out_features", "in_features", "n",
              "sparsity", "method", "time_us", "speedup", "ideal", "gbps", "frac_copy", "copy_gbps", "err",
              "timing", "config", "sm_mhz", "flush", "floor_us"]


def write_csv(rows: list[Row], env: dict, dtype: str, path: str) -> None:
    """Long format, appended (with a header when the file is new), one line per measurement."""
    run = {k: env[k] for k in ("gpu", "date", "torch", "cuda", "flashllm", "copy_gbps", "flush", "floor_us")}
    append_rows(path, CSV_FIELDS, ({**asdict(r), **run, "dtype": dtype} for r in rows))


def plot(rows: list[Row], env: dict, path: str) -> bool:
    """Speedup over cuBLAS vs sparsity, one panel per N, geomean over layers; dashed: the ideal."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    ns = sorted({r.n for r in rows})
    methods = sorted({r.method for r in rows if r.method not in ("cublas", "dense")})
    fig, axes = plt.subplots(1, len(ns), figsize=(4 * len(ns), 3.6), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], ns):
        for method in methods:
            pts = {}
            for r in rows:
                if r.n == n and r.method == method:
                    pts.setdefault(r.sparsity, []).append((r.speedup, r.ideal))
            if not pts:
                continue
            xs = sorted(pts)
            geo = [statistics.geometric_mean(p[0] for p in pts[s]) for s in xs]
            ideal = [statistics.geometric_mean(p[1] for p in pts[s]) for s in xs]
            line, = ax.plot(xs, geo, marker="o", label=method)
            if len(xs) > 1:
                ax.plot(xs, ideal, linestyle="--", color=line.get_color(), alpha=0.5)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(f"N = {n}")
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup over cuBLAS (dashed: ideal)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, {env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------
def _option_bests(fmt: str, timings) -> str:
    """Each kernel option's best time over the other settings, e.g. `fragment 41.2 us | scatter
    38.0 us`: an A/B in which each side is tuned on its own."""
    options = {"decode": str, "buffers": lambda c: "fit" if c.value_cap == FIT else "full"} if fmt == "bitmap" \
        else {"warps": str, "dense_tiles": str}
    parts = []
    for name, label in options.items():
        best: dict = {}
        for ms, cfg in timings:
            value = label(cfg) if name == "buffers" else label(getattr(cfg, name))
            best[value] = min(ms, best.get(value, float("inf")))
        parts.append(f"best per {name}: " + " | ".join(f"{v} {ms * 1e3:.1f} us" for v, ms in best.items()))
    return "; ".join(parts)


def tune(args) -> int:
    from ..formats import get_format
    from ..kernels import configs, cuda_module, launch

    device = torch.device(args.device)
    if device.type != "cuda":
        print("--tune needs a CUDA device", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    arch = configs.arch_key(torch.cuda.get_device_capability(device))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    timer = _timer(device, args.warmup, args.rep, args.flush)
    skip = set(args.skip_options)
    table: dict[tuple, configs.LaunchConfig] = {}
    for name, m, k in resolve_shapes(args.shapes):
        for n in args.n:
            x = torch.randn(n, k, device=device, dtype=dtype, generator=gen)
            for s in args.sparsity:
                w = random_pruned(m, k, s, dtype, device, gen)
                ref = x.float() @ w.float().T
                # The candidates cover every option, so "bitmap:scatter" tunes as "bitmap".
                for fmt in dict.fromkeys(parse_format(f)[0] for f in args.formats):
                    if fmt in skip:  # a pending format that failed its smoke test
                        continue
                    module = cuda_module(fmt)
                    weight = get_format(fmt).from_dense(w)
                    kt = -(-k // 64)
                    # The benchmark's own timing (graph replay, L2 flushed), so the winners are
                    # what `flashllm bench kernels` will measure.
                    offered = configs.tuning_candidates(fmt, n, s, kt, unvalidated=not args.validated_only)
                    candidates = [c for c in offered if not set(configs.unvalidated_options(c)) & skip]
                    best, best_ms, timings = launch.tune(
                        lambda c, module=module, x=x, weight=weight: module.linear(x, weight, None, c),
                        candidates,
                        timer=lambda fn: timer(_graphed(fn, device)[0]),
                        check=lambda y, ref=ref: launch.output_problem(y, ref),  # unvalidated options are tried
                    )
                    default = next((ms for ms, c in timings if c == configs.default_config(fmt, n, s)), float("nan"))
                    key = configs.key_for(arch, fmt, m, k, n, s)
                    table[key] = best
                    print(f"{name:20s} N={n:<4d} s={s:.2f} {fmt:9s} best {best_ms * 1e3:8.1f} us "
                          f"(default {default * 1e3:8.1f} us) {best}", flush=True)
                    print(f"{name:20s} N={n:<4d} s={s:.2f} {fmt:9s} {_option_bests(fmt, timings)}", flush=True)
                    if args.write_configs:  # after every winner, so a run cut short keeps what it found
                        configs.merge_into_file(args.write_configs, {key: best})
                del w
    print("\n# paste into flashllm/kernels/configs.py TUNED (measured on "
          f"{torch.cuda.get_device_name(device)}):\n{configs.python_literal(table)}")
    if args.write_configs:
        print(f"wrote {len(table)} entries to {args.write_configs} (use with FLASHLLM_KERNEL_CONFIGS)")
    return 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="all",
                        help=f"comma list of models ({', '.join(SHAPES)}), layers (e.g. opt-66b.qkv), 'all' or MxK")
    parser.add_argument("--n", default=",".join(map(str, DEFAULT_N)), help="batch sizes (activation rows)")
    parser.add_argument("--sparsity", default=",".join(map(str, DEFAULT_SPARSITY)), help="weight sparsities")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                        help="flashllm formats to time (tiled_csl16, whose kernel has not run on a GPU yet, by "
                             "name); bitmap:scatter or tiled_csl:warps8 time a kernel with that option under the "
                             "same launch (an A/B)")
    parser.add_argument("--expand", action="store_true",
                        help="also time each format's expansion kernel + cuBLAS (the path of products above "
                             "FLASHLLM_KERNEL_MAX_N rows) as <format>:expand, for the crossover with the fused kernel")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="cublas, csr (cuSPARSE), 2:4 (at 0.5 only)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16",
                        help="fp32 times only the baselines and the reference path (the kernels take fp16/bf16)")
    parser.add_argument("--quick", action="store_true",
                        help=f"preset for a few minutes of GPU time: {QUICK['shapes']}, N {QUICK['n']}, "
                             f"sparsity {QUICK['sparsity']}")
    parser.add_argument("--sample", type=int, default=None,
                        help="time only this many (layer, N, sparsity) points, drawn at random with --seed")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU through the reference path: checks table, CSV and plot")
    parser.add_argument("--reference", action="store_true", help="time flashllm's reference path, not the kernels")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    parser.add_argument("--flush", choices=FLUSHES, default="read",
                        help="L2 flush before each timed call: read (sum a 256 MiB buffer; leaves clean "
                             "lines, as between a decode step's layers) or write (zero it, as do_bench "
                             "does; leaves dirty lines, whose write-back slows bandwidth-bound kernels)")
    parser.add_argument("--chain", type=int, default=1, metavar="K",
                        help="time K back-to-back products, each with its own weight, as one graph and report "
                             "the time per product (a decode step's neighbours instead of one product after the "
                             "timer's event; what programmatic dependent launch, pdl, overlaps). Default 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the CSV and PNG (default: $OUT or ./bench_out)")
    parser.add_argument("--csv", default=None, help="CSV to append to (default: <out>/kernels.csv)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--tune", action="store_true",
                        help="time candidate launch configs instead of benchmarking (--warmup/--rep per candidate)")
    parser.add_argument("--write-configs", default=None, help="with --tune: JSON table to merge the winners into")
    parser.add_argument("--validated-only", action="store_true",
                        help="with --tune: leave out the options not yet validated on a GPU (configs.UNVALIDATED)")
    parser.add_argument("--skip-options", default="",
                        help="with --tune: leave out these pending options (configs.pending_options names, "
                             "e.g. fit,prefetch)")


def _finish_args(args) -> argparse.Namespace:
    if args.sample is not None and args.sample < 1:
        raise ValueError(f"--sample must be at least 1, got {args.sample}")
    if args.chain < 1:
        raise ValueError(f"--chain must be at least 1, got {args.chain}")
    if args.dry_run:
        args.shapes, args.n, args.sparsity = DRY_RUN["shapes"], DRY_RUN["n"], DRY_RUN["sparsity"]
        args.device = "cpu"
        args.baselines = "cublas,csr"
        args.dtype = "fp32"  # CPU half matmuls are slow and CPU CSR has no half kernel
    elif args.quick:
        args.shapes, args.n, args.sparsity = QUICK["shapes"], QUICK["n"], QUICK["sparsity"]
    if isinstance(args.shapes, str):
        args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if isinstance(args.n, str):
        args.n = _parse_list(args.n, int)
    if isinstance(args.sparsity, str):
        args.sparsity = _parse_list(args.sparsity, float)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    args.skip_options = [o.strip() for o in args.skip_options.split(",") if o.strip()]
    unknown = sorted(set(args.skip_options) - set(PENDING_NAMES))
    if unknown:
        raise ValueError(f"unknown --skip-options {unknown}: options (and pending formats) are {list(PENDING_NAMES)}")
    for f in args.formats:
        parse_format(f)  # raises on an unknown name
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(args: argparse.Namespace) -> int:
    args = _finish_args(args)
    if args.tune:
        return tune(args)
    if args.device == "cpu" and not args.dry_run:
        print("no CUDA device: timing the CPU reference path (use --dry-run for a quick plumbing check)",
              file=sys.stderr)
    rows, env = run(args)
    if not rows:
        print("nothing was measured", file=sys.stderr)
        return 1
    out_dir = args.out or os.environ.get("OUT") or "bench_out"
    os.makedirs(out_dir, exist_ok=True)
    csv_path = args.csv or os.path.join(out_dir, "kernels.csv")
    write_csv(rows, env, args.dtype, csv_path)
    print()
    print(format_table(rows))
    print()
    print(summary(rows))
    print(f"\nCSV: {csv_path}")
    if not args.no_plot:
        png = os.path.join(out_dir, "kernels_speedup.png")
        if plot(rows, env, png):
            print(f"plot: {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashllm bench kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
