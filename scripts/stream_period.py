"""Per-tile period of each probe row: the time a resident block spends per weight tile.

    python scripts/stream_period.py bench-results/h200-2026-11-27/call1_probes.csv [--level stream]

For every row of a `python -m flashllm.bench.probes` CSV at the given level, P = time x (SMs x
blocks per SM) / tiles: how long one resident block slot takes per tile. If a deeper pipeline
hid the copies' latency, P would fall with more stages; if it does not, something per iteration
waits (BENCHMARKS.md, tenth session). Also printed: the launch's stages, its K splits (resolved
as the launcher does when the row's split is automatic), tiles per block, waves of blocks, and
the compressed bytes per tile. Stream-K rows (persistent) run one block per slot: one wave.
"""

from __future__ import annotations

import argparse
import csv
import re

from flashllm.formats.bitmap import GROUP_K, GROUP_M
from flashllm.formats.tiled_csl import TILE_K, TILE_M
from flashllm.kernels.configs import auto_split_k, persistent_blocks
from flashllm.kernels.launch import split_plan

SMS = 132  # H100 SXM and H200; the CSVs do not record it
TILE = {"bitmap": (GROUP_M, GROUP_K), "tiled_csl": (TILE_M, TILE_K)}


def _field(config: str, name: str) -> str:
    found = re.search(rf"{name}=([^,)]+)", config)
    return found.group(1) if found else ""


def period_rows(rows: list[dict], level: str) -> list[dict]:
    out = []
    for r in rows:
        if r["level"] != level:
            continue
        fmt = "bitmap" if r["method"].startswith("bitmap") else "tiled_csl"
        m, k, n, s = int(r["out_features"]), int(r["in_features"]), int(r["n"]), float(r["sparsity"])
        cfg = r["config"]
        stages, split = int(_field(cfg, "stages")), int(_field(cfg, "split_k"))
        tps = int(_field(cfg, "tiles_per_stage") or 1)
        slots = SMS * int(r["blocks_per_sm"])
        rows_per_tile, cols = TILE[fmt]
        strips, k_tiles = -(-m // rows_per_tile), -(-k // cols)
        blocks_m = -(-strips // int(_field(cfg, "strips") or 1))
        nbytes = (1 / 8 + 2 * (1 - s)) if fmt == "bitmap" else 4 * (1 - s)  # per weight element, fp16
        if _field(cfg, "persistent") == "True":
            blocks = persistent_blocks(strips * k_tiles, slots, 1)
            per_block = strips * k_tiles / blocks
        else:  # as CudaKernel.plan picks the split (one block along N: the probes' N <= 16)
            if split == 0:
                split = auto_split_k(k_tiles, blocks_m, slots, n, k, nbytes)
            splits, per_block = split_plan(k_tiles, split)
            blocks = blocks_m * splits
        tiles = strips * k_tiles
        out.append({"shape": r["shape"], "n": n, "sparsity": s, "method": r["method"], "stages": stages, "tps": tps,
                    "tiles_per_block": per_block, "waves": blocks / slots,
                    "kb_per_tile": rows_per_tile * cols * nbytes / 1024,
                    "period_ns": float(r["time_us"]) * 1e3 * slots / tiles})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="a probes CSV (python -m flashllm.bench.probes --csv ...)")
    parser.add_argument("--level", default="stream", help="stream (default), scan, decode, scatter or full")
    args = parser.parse_args()
    with open(args.csv, newline="") as fh:
        rows = period_rows(list(csv.DictReader(fh)), args.level)
    print(f"{'layer':16s} {'N':>3s} {'spars':>5s} {'method':28s} {'stages':>6s} {'tiles/blk':>9s} {'waves':>5s} "
          f"{'KB/tile':>7s} {'P ns':>6s}")
    for r in rows:
        stages = f"{r['stages']}x{r['tps']}" if r["tps"] > 1 else str(r["stages"])
        print(f"{r['shape']:16s} {r['n']:3d} {r['sparsity']:5.2f} {r['method']:28s} {stages:>6s} "
              f"{r['tiles_per_block']:9.1f} {r['waves']:5.1f} {r['kb_per_tile']:7.2f} {r['period_ns']:6.0f}")


if __name__ == "__main__":
    main()
