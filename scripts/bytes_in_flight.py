"""Weight bytes in flight per SM for the kernels' launch configurations, against what the DRAM
latency needs (Little's law). No GPU needed; it needs nvcc for the register counts (or --regs).

    python scripts/bytes_in_flight.py                       # bitmap and Tiled-CSL, N 8/16/32
    python scripts/bytes_in_flight.py --nrows 16 --sparsity 0.8 0.9

A memory-bound kernel streams at most (bytes in flight) / latency: to run the H200's 4.27 TB/s
over 132 SMs (32 GB/s per SM) it needs ~19 KB in flight per SM at 600 ns of DRAM latency and
~32 KB at 1 us. What a block keeps in flight while its warps work:
  * bitmap: `stages - 1` tiles (at the top of iteration i it waits for tile i, then issues tile
    i + stages - 1), 512 mask bytes plus the tile's run of values each;
  * Tiled-CSL with two dense tiles: `stages - 2` (it scatters tile i + 1 while the tensor cores
    read tile i, so it waits for tile i + 1 first); with one dense tile (`dense_tiles=1`)
    `stages - 1`; 4 bytes per non-zero of the 128 x 64 tile, at most `words_per_stage` words (a
    denser tile loads the rest synchronously, which this leaves out);
  * either, with an L2 prefetch (`prefetch=P`): P tiles more, their whole runs, requested into L2
    ahead of the copies (in flight to L2, not to shared memory).
Resident blocks per SM: the least of shared memory (228 KB per SM, 1 KB reserved per block),
registers (64K per SM, from the compiled kernel) and 16 blocks. The activations (a few KB per
stage, read from L2 by every block) are left out: this counts the weight stream only. Fitted
bitmap buffers (`value_cap=FIT`) take the cap that holds the longest run of a large layer
(`configs.typical_fit`: mean + 4.5 standard deviations of a tile's count at that density).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bitmap_cost_model import nvcc_cubin  # noqa: E402
from flashllm.kernels.configs import FIT, LaunchConfig, default_config, kernel_source, typical_fit  # noqa: E402

SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
REGISTERS_PER_SM = 65536
MAX_BLOCKS = 16
BYTES_PER_SM_SECOND = 4.27e12 / 132  # H200 copy bandwidth over its SMs


def registers(fmt: str, cfg: LaunchConfig, nvcc: str, cache: dict) -> int:
    defines = cfg.defines(fmt)
    key = (fmt, tuple(sorted(defines.items())))
    if key not in cache:
        with tempfile.TemporaryDirectory() as tmp:
            report = nvcc_cubin(kernel_source(fmt), defines, os.path.join(tmp, "k.cubin"), nvcc)
        cache[key] = int(re.search(r"Used (\d+) registers", report).group(1))
    return cache[key]


def tile_bytes(fmt: str, cfg: LaunchConfig, density: float, capped: bool = True) -> int:
    """Weight bytes of one tile that the pipeline copies ahead: a Tiled-CSL tile over its stage
    buffer's `words_per_stage` loads the rest synchronously when it is scattered (`capped`; an L2
    prefetch asks for the whole run)."""
    if fmt == "bitmap":
        return 512 + math.ceil(4096 * density / 8) * 8 * 2
    words = math.ceil(8192 * density / 4) * 4
    return min(words, cfg.words_per_stage) * 4 if capped else words * 4


def depth(fmt: str, cfg: LaunchConfig) -> int:
    if fmt == "bitmap" or cfg.dense_tiles == 1:
        return cfg.stages - 1
    return cfg.stages - 2


def variants(fmt: str, nrows: int, sparsity: float) -> list[tuple[str, LaunchConfig]]:
    base = typical_fit(default_config(fmt, nrows, sparsity), sparsity)
    if fmt == "bitmap":
        fitted = typical_fit(replace(base, decode="fragment", value_cap=FIT), sparsity)
        return [("shipped rule", base), ("fitted, 3 stages", fitted),
                ("fitted, 4 stages", replace(fitted, stages=4)), ("fitted, 6 stages", replace(fitted, stages=6)),
                ("shipped + L2 prefetch 4", replace(base, prefetch=4))]
    return [("shipped rule", base), ("6 stages x 1024 words", replace(base, stages=6, words_per_stage=1024, warps=4)),
            ("two dense tiles", replace(base, dense_tiles=2)),
            ("two dense tiles, 6x1024", replace(base, dense_tiles=2, stages=6, words_per_stage=1024, warps=4)),
            ("shipped + L2 prefetch 4", replace(base, prefetch=4))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="*", default=["bitmap", "tiled_csl"])
    ap.add_argument("--nrows", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--regs", type=int, help="registers per thread for every variant (instead of compiling)")
    ap.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    args = ap.parse_args()
    if args.regs is not None and args.regs <= 0:
        raise SystemExit(f"--regs must be a positive register count, got {args.regs}")
    if args.regs is None and shutil.which(args.nvcc) is None:
        raise SystemExit(f"{args.nvcc} not found: install the CUDA toolkit or pass --regs")
    need = {lat: BYTES_PER_SM_SECOND * lat * 1e-9 / 1024 for lat in (600, 1000)}
    print(f"Little's law at 4.27 TB/s over 132 SMs: {need[600]:.0f} KB per SM at 600 ns, {need[1000]:.0f} KB at 1 us")
    print("format    | N  | sparsity | launch                   | stages | smem KB | regs | blocks/SM | tiles in flight/block "
          "| tile KB | KB in flight/SM")
    cache: dict = {}
    for fmt in args.formats:
        for nrows in args.nrows:
            for s in args.sparsity:
                for label, cfg in variants(fmt, nrows, s):
                    smem = cfg.smem_bytes(fmt)
                    regs = args.regs if args.regs is not None else registers(fmt, cfg, args.nvcc, cache)
                    blocks = min(SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK),
                                 REGISTERS_PER_SM // (regs * cfg.threads), MAX_BLOCKS)
                    tile = tile_bytes(fmt, cfg, 1 - s)
                    ahead = cfg.prefetch * tile_bytes(fmt, cfg, 1 - s, capped=False)
                    flight = blocks * (depth(fmt, cfg) * tile + ahead) / 1024
                    tiles = f"{depth(fmt, cfg)}" + (f" + {cfg.prefetch} in L2" if cfg.prefetch else "")
                    print(f"{fmt:9} | {nrows:2} | {s:8.0%} | {label:24} | {cfg.stages:6} | {smem / 1024:7.1f} | {regs:4} "
                          f"| {blocks:9} | {tiles:>21} | {tile / 1024:7.1f} | {flight:15.0f}")


if __name__ == "__main__":
    main()
