"""How two `flashllm bench kernels` runs compare, point by point: did a kernel change make it faster?

    python scripts/compare_sweeps.py OLD.csv NEW.csv [--methods bitmap,tiled_csl]

Rows are matched by (dtype, shape, N, sparsity, method); for each method the geometric mean of
old time / new time is printed per sparsity and per N (above 1: the new run is faster). Two runs
on different machines or days also differ in the GPU's state, so the same ratio for cuBLAS, which
did not change, is printed first: a kernel's ratio divided by cuBLAS's is its change net of that
drift (the "net" columns, the ratio of the two runs' speedups over cuBLAS).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict


def read(path: str) -> dict[tuple, float]:
    """(dtype, shape, n, sparsity, method) -> time in µs, for every row with a time."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                t = float(row["time_us"])
            except (KeyError, ValueError):
                continue
            if t > 0 and math.isfinite(t):
                out[(row["dtype"], row["shape"], int(row["n"]), round(float(row["sparsity"]), 3), row["method"])] = t
    return out


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def compare(old: dict[tuple, float], new: dict[tuple, float], methods: list[str] | None = None) -> list[str]:
    """The report's lines: per method, old/new time ratios (geomean) by sparsity and by N, net of
    cuBLAS's ratio at the same (dtype, shape, N)."""
    common = sorted(set(old) & set(new))
    if not common:
        return ["no point is in both runs"]
    cublas = {k[:3]: old[k] / new[k] for k in common if k[4] == "cublas"}
    groups: dict[tuple, list[tuple[float, float | None]]] = defaultdict(list)
    for k in common:
        dtype, _shape, n, sparsity, method = k
        if method == "cublas" or (methods and method not in methods):
            continue
        ratio = old[k] / new[k]
        drift = cublas.get(k[:3])
        net = ratio / drift if drift else None
        groups[(method, "sparsity", sparsity)].append((ratio, net))
        groups[(method, "N", n)].append((ratio, net))
    lines = [f"{len(common)} points in both runs"]
    if cublas:
        lines.append(f"cublas: old / new time {geomean(list(cublas.values())):.3f} over {len(cublas)} points "
                     "(the runs' drift; the net ratios divide it out)")
    lines.append("| method | by | value | points | old / new time | net of cuBLAS |")
    lines.append("|---|---|---|---|---|---|")
    for (method, by, value), pairs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        ratios = [r for r, _ in pairs]
        nets = [n for _, n in pairs if n is not None]
        shown = f"{value:.0%}" if by == "sparsity" else str(value)
        net = f"{geomean(nets):.3f}" if nets else "-"
        lines.append(f"| {method} | {by} | {shown} | {len(pairs)} | {geomean(ratios):.3f} | {net} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--methods", help="comma-separated methods to report (default: all but cublas)")
    args = parser.parse_args(argv)
    methods = args.methods.split(",") if args.methods else None
    print("\n".join(compare(read(args.old), read(args.new), methods)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
