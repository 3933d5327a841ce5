"""Where expansion + cuBLAS overtakes the fused kernels, from times measured separately.

    python scripts/crossover_estimate.py bench-results/h200-2026-11-27b/call4_n64_n128.csv \
        --expand-fraction bitmap=0.55,tiled_csl=0.89

A product above `FLASHLLM_KERNEL_MAX_N` rows expands the weight (one kernel: the compressed bytes
read, the dense bytes written) and multiplies with cuBLAS. Until the device script's crossover
step (`DEVICE_CHECK_CROSSOVER=1`, which times both paths in one run) has run, the setting comes from
this: each fused-kernel point of a `flashllm bench kernels` CSV against the cuBLAS time of the same
layer and N plus the expansion's time at the given fraction of the run's copy bandwidth (`flashllm
bench formats` measured 51-58% for bitmap and 86-92% for Tiled-CSL on an H200). The estimate leaves
out what favors the expansion path further: the dense weight it writes is partly still in L2 when
cuBLAS reads it.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict


def ratios(rows: list[dict], fraction: dict[str, float]) -> dict[tuple[int, str, float], list[float]]:
    """(N, format, sparsity) -> per layer, the fused kernel's time over expansion + cuBLAS's."""
    cublas = {(r["shape"], r["n"]): float(r["time_us"]) for r in rows if r["method"] == "cublas"}
    out = defaultdict(list)
    for r in rows:
        if r["method"] not in fraction or (r["shape"], r["n"]) not in cublas:
            continue
        dense = 2 * int(r["out_features"]) * int(r["in_features"])  # fp16 / bf16 bytes
        moved = dense / float(r["ideal"]) + dense  # the stored weight read (ideal: dense / stored), the dense written
        expand_us = moved / (fraction[r["method"]] * float(r["copy_gbps"]) * 1e9) * 1e6
        path_us = expand_us + cublas[(r["shape"], r["n"])]
        out[(int(r["n"]), r["method"], float(r["sparsity"]))].append(float(r["time_us"]) / path_us)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="a flashllm bench kernels CSV with cublas and format rows")
    parser.add_argument("--expand-fraction", default="bitmap=0.55,tiled_csl=0.89",
                        help="each format's expansion kernel, as a fraction of copy bandwidth")
    args = parser.parse_args(argv)
    fraction = {fmt: float(v) for fmt, v in (item.split("=") for item in args.expand_fraction.split(","))}
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    print("| N | format | sparsity | fused / (expansion + cuBLAS), geomean | min | max | expansion faster |")
    print("|---|---|---|---|---|---|---|")
    for (n, fmt, s), v in sorted(ratios(rows, fraction).items()):
        geomean = math.exp(sum(map(math.log, v)) / len(v))
        print(f"| {n} | {fmt} | {s:.0%} | {geomean:.2f} | {min(v):.2f} | {max(v):.2f} | "
              f"{sum(x > 1 for x in v)} / {len(v)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
