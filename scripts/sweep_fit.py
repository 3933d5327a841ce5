"""Each method's time as a fixed cost plus a rate per dense byte, fitted over a sweep's layers.

    python scripts/sweep_fit.py bench-results/h200-2026-11-27d/call1_sweep.csv [--n 8]

A least-squares line time = a + b x (the layer's dense fp16 MB) per method, sparsity and N, over
the layers of a `flashllm bench kernels` CSV (the device script's sweep: 18 layers, 34-940 MB).
The intercept a is what a call costs whatever its size (launches, pipeline fill, the partial last
wave, split-K's epilogue); the slope b is the rate at which the method gets through a weight once
it streams. A kernel whose slope does not fall with sparsity is bound per element of the weight,
not per byte it reads: its speedup over cuBLAS can never pass cuBLAS's slope over its own, however
sparse the weight. The slope ratio column is that asymptote.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict


def fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(intercept, slope, rms residual) of the least-squares line through (x, y) points."""
    slope, intercept = statistics.linear_regression(*zip(*points))
    rms = statistics.fmean((y - intercept - slope * x) ** 2 for x, y in points) ** 0.5
    return intercept, slope, rms


def fits(rows: list[dict]) -> dict[tuple[int, str, float], tuple[float, float, float]]:
    """(N, method, sparsity) -> `fit` of its time (µs) against the dense fp16 weight's MB."""
    points = defaultdict(list)
    for r in rows:
        dense_mb = int(r["out_features"]) * int(r["in_features"]) * 2 / 1e6
        points[(int(r["n"]), r["method"], float(r["sparsity"]))].append((dense_mb, float(r["time_us"])))
    return {key: fit(p) for key, p in points.items() if len({x for x, _ in p}) > 1}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="a flashllm bench kernels CSV (a sweep over many layers)")
    parser.add_argument("--n", default=None, help="activation rows to show, comma-separated (default: all)")
    args = parser.parse_args(argv)
    with open(args.csv) as f:
        table = fits(list(csv.DictReader(f)))
    wanted = None if args.n is None else {int(v) for v in args.n.split(",")}
    print("| N | method | sparsity | fixed µs | ns per dense MB | rms µs | cuBLAS slope / slope |")
    print("|---|---|---|---|---|---|---|")
    for (n, method, s), (a, b, rms) in sorted(table.items()):
        if wanted is not None and n not in wanted:
            continue
        cublas = table.get((n, "cublas", 0.0))
        ratio = f"{cublas[1] / b:.2f}" if cublas else "-"
        print(f"| {n} | {method} | {s:.0%} | {a:.1f} | {b * 1e3:.0f} | {rms:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
