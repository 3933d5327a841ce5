"""Where the CUDA kernels' time goes: each kernel timed again with the later parts of its work left out.

    python -m flashllm.bench.probes                    # Llama-2-7B up_proj, OPT-66B qkv; N 1, 16; 50/80/90%
    python -m flashllm.bench.probes --shapes llama-2-7b.up --n 16 --sparsity 0.5 --formats bitmap,bitmap:fit

Each kernel is compiled again with FLASHLLM_PROBE (cuda/*.cu) under the launch configuration the
library picks for the layer (or that configuration with a `--formats` option, as in `flashllm
bench kernels`), and timed the same way (CUDA-graph replay, L2 flushed, do_bench median):

  stream    the pipeline alone: the compressed weight and the activations copied into shared memory
            stage by stage, with the waits and barriers (Tiled-CSL: and the reloads of dense tiles)
  scan      + the bitmap kernel's per-warp mask scan (its scatter decode: + the scatter)
  scatter   + the Tiled-CSL scatter into the zeroed dense tile and the re-zeroing
  decode    + the bitmap kernel's fragment assembly, without the activations' loads and the mma
  full      the kernel

next to cuBLAS on the dense weight and "floor", the compressed bytes at the copy bandwidth
measured in the same run. How to read it: when stream is close to full, the pipeline (bytes in
flight per SM, the latency of the weight stream, the copy issue) sets the time, and a cheaper
decode cannot help; the steps between levels are what each part adds on top (parts overlap, so
they are not exclusive costs). The SM clock NVML reads while each level is timed is printed too:
an issue-bound level's time follows the clock, a memory-bound one's does not. Resident blocks per
SM are printed per level: a probe that needs fewer registers may fit more blocks, which makes it
faster for that reason alone. Only the full level's output is the product (checked, "err").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.configs import LaunchConfig
from . import kernels as bench
from .csvlog import append_rows

# Probe levels per format, in the order of the work they add (FLASHLLM_PROBE values; 0 is the kernel).
LEVELS = {
    "bitmap": (("stream", 1), ("scan", 2), ("decode", 3), ("full", 0)),
    "tiled_csl": (("stream", 1), ("scatter", 2), ("full", 0)),
}
DEFAULTS = {"shapes": "llama-2-7b.up,opt-66b.qkv", "n": "1,16", "sparsity": "0.5,0.8,0.9",
            "formats": "bitmap,tiled_csl"}


@dataclass(frozen=True)
class ProbeConfig(LaunchConfig):
    """A launch configuration compiled with FLASHLLM_PROBE = `probe`: a diagnostic build whose
    output is not the product unless `probe` is 0."""

    probe: int = 0

    def defines(self, fmt: str) -> dict[str, int]:
        d = super().defines(fmt)
        if self.probe:
            d["FLASHLLM_PROBE"] = self.probe
        return d


@dataclass
class ProbeRow:
    shape: str
    out_features: int
    in_features: int
    n: int
    sparsity: float
    method: str  # a --formats entry, e.g. "bitmap" or "bitmap:fit"
    level: str
    time_us: float
    of_full: float  # time / the full kernel's time
    floor_us: float  # compressed bytes at the measured copy bandwidth
    cublas_us: float
    blocks_per_sm: int
    sm_mhz: float  # NVML's median while timed; nan without NVML
    err: float  # the full level's relative error against F.linear; nan for the probes
    config: str


def probe_configs(fmt: str, cfg: LaunchConfig) -> list[tuple[str, ProbeConfig]]:
    return [(level, ProbeConfig(**asdict(cfg), probe=p)) for level, p in LEVELS[fmt]]


def run(args) -> tuple[list[ProbeRow], dict]:
    from ..formats import get_format
    from ..kernels import cuda_module

    device = torch.device(args.device)
    dtype = bench.DTYPES[args.dtype]
    timed_call, env = bench.start_run(device, args.warmup, args.rep, args.flush)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def timed(fn) -> tuple[float, float]:  # graph replays, as `flashllm bench kernels` times them
        return timed_call(bench._graphed(fn, device)[0])

    rows: list[ProbeRow] = []
    for name, m, k in bench.resolve_shapes(args.shapes):
        for n in args.n:
            x = torch.randn(n, k, device=device, dtype=dtype, generator=gen)
            for s in args.sparsity:
                w = bench.random_pruned(m, k, s, dtype, device, gen)
                cublas_ms, _ = timed(lambda x=x, w=w: F.linear(x, w))
                expected = F.linear(x, w).float()
                for method in args.formats:
                    fmt, options = bench.parse_format(method)
                    module = cuda_module(fmt)
                    weight = get_format(fmt).from_dense(w)
                    tensors = list(weight.tensors().values())
                    cfg = bench.configured_launch(weight, n, options, device)
                    if cfg.cores:  # the CUDA-core path has no levels to leave out (and no dense tile)
                        print(f"  {method}: no probe levels for the CUDA-core path", flush=True)
                        continue
                    floor_ms = weight.nbytes / (env["copy_gbps"] * 1e9) * 1e3
                    measured = []
                    for level, pcfg in probe_configs(fmt, cfg):
                        run_once = lambda c=pcfg: module.linear(x, weight, None, c)  # noqa: E731
                        got = run_once().float()
                        err = float("nan") if pcfg.probe else \
                            ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
                        ms, mhz = timed(run_once)
                        kernel = module.KERNEL.compiled(module.KERNEL.fit_buffers(pcfg, tensors), dtype, device)
                        measured.append((level, ms, mhz, kernel.occupancy, err))
                    full_ms = measured[-1][1]
                    launched = str(module.KERNEL.fit_buffers(cfg, tensors))  # fitted buffers resolved
                    for level, ms, mhz, blocks, err in measured:
                        rows.append(ProbeRow(name, m, k, n, s, method, level, ms * 1e3, ms / full_ms, floor_ms * 1e3,
                                             cublas_ms * 1e3, blocks, mhz, err, launched))
                    print("  " + format_line(rows[-len(measured):]), flush=True)
                del w, expected
                torch.cuda.empty_cache()
    return rows, env


def format_line(group: list[ProbeRow]) -> str:
    """One (layer, N, sparsity, method): every level's time, then what the full kernel achieves."""
    full = group[-1]
    levels = " ".join(f"{r.level} {r.time_us:7.1f}" for r in group)
    blocks = "/".join(str(r.blocks_per_sm) for r in group)
    mhz = "/".join("n/a" if r.sm_mhz != r.sm_mhz else f"{r.sm_mhz:.0f}" for r in group)
    return (f"{full.shape:16s} N={full.n:<3d} s={full.sparsity:.2f} {full.method:18s} | cuBLAS {full.cublas_us:7.1f} "
            f"floor {full.floor_us:6.1f} | {levels} us | stream {group[0].of_full:4.0%} of full | "
            f"blocks/SM {blocks} | MHz {mhz} | err {full.err:.1e}")


def summary(rows: list[ProbeRow]) -> str:
    """Per method and sparsity, the geometric mean over layers and N of each level's share of the
    full kernel's time."""
    shares: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        shares.setdefault((r.method, r.sparsity), {}).setdefault(r.level, []).append(r.of_full)
    lines = ["share of the full kernel's time per level (geomean over layers and N):"]
    for (method, s), levels in sorted(shares.items()):
        parts = "  ".join(f"{lv} {statistics.geometric_mean(v):4.0%}" for lv, v in levels.items())
        lines.append(f"  {method:18s} s={s:.2f}  {parts}")
    return "\n".join(lines)


RUN_FIELDS = ["gpu", "date", "torch", "cuda", "flashllm", "copy_gbps", "max_sm_mhz", "flush"]
CSV_FIELDS = [*RUN_FIELDS, *ProbeRow.__dataclass_fields__]


def write_csv(rows: list[ProbeRow], env: dict, path: str) -> None:
    run = {k: env.get(k) for k in RUN_FIELDS}
    append_rows(path, CSV_FIELDS, ({**run, **asdict(r)} for r in rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flashllm.bench.probes", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shapes", default=DEFAULTS["shapes"], help="as `flashllm bench kernels --shapes`")
    parser.add_argument("--n", default=DEFAULTS["n"], help="batch sizes (activation rows)")
    parser.add_argument("--sparsity", default=DEFAULTS["sparsity"])
    parser.add_argument("--formats", default=DEFAULTS["formats"],
                        help="bitmap, tiled_csl, or either with a kernel option (bitmap:fit, tiled_csl:dense1, ...)")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--warmup", type=int, default=10, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=40, help="do_bench measuring time, ms")
    parser.add_argument("--flush", choices=bench.FLUSHES, default="read",
                        help="L2 flush before each timed call (as `flashllm bench kernels --flush`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--csv", default=None, help="CSV to append to (default: $OUT/probes.csv or ./bench_out)")
    return parser


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.n = bench._parse_list(args.n, int)
    args.sparsity = bench._parse_list(args.sparsity, float)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in args.formats:
        bench.parse_format(f)  # raises on an unknown name or option
    bench.resolve_shapes(args.shapes)  # likewise
    return args


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    try:
        args = finish_args(parser.parse_args(argv))
    except ValueError as err:
        parser.error(str(err))
    if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        print("the probes time the CUDA kernels: they need a CUDA device", file=sys.stderr)
        return 2
    rows, env = run(args)
    path = args.csv or os.path.join(os.environ.get("OUT") or "bench_out", "probes.csv")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_csv(rows, env, path)
    print()
    print(summary(rows))
    print(f"\nCSV: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
