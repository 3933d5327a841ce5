"""Launch configurations of the CUDA kernels: a table keyed by GPU architecture, format, layer shape
class, batch bucket and sparsity band, and the rules used where the table has no entry.

STATUS: the shape-class entries of `TUNED` were measured on an H200: on 2026-11-26 Llama-2-7B
up_proj and OPT-66B out_proj at N 1/16/64, sparsity 0.5/0.8/0.9, OPT-66B qkv_proj and Llama-3-70B
down_proj at N 16; on 2026-11-27 Llama-2-7B up_proj and OPT-66B qkv_proj at N 8/16/32, sparsity
0.5/0.8, with every option offered (see BENCHMARKS.md). Everything else comes from
`default_config` and `auto_split_k`, whose rules follow those winners: one 64-row strip per
bitmap block, 3 stages, the scatter decode from 85% sparsity at N <= 16, stage buffers fitted to
the weight from 75% up to 32 rows; Tiled-CSL stages of 2-3K words, one dense tile up to 32 rows, 8
warps at 75-85% and N <= 16; as many K splits as keep each split 4 tiles deep, up to 16. Every
option but Hopper's warpgroup MMA (`wgmma`) and programmatic dependent launch (`pdl`), written
since and pending in `UNVALIDATED`, has run on a GPU; the L2 prefetch (`prefetch`) and split-K ended by the last block of each output tile (`fixup`)
measured slower and are left to the tuner. To tune more shapes or another GPU:

    flashllm bench kernels --tune --shapes opt-66b,llama-70b --n 1,8,16,32,64 \\
        --sparsity 0.5,0.7,0.8,0.9 --write-configs tuned.json

prints the winners as Python literals to paste into `TUNED` (and writes them to ``tuned.json``).
Setting ``FLASHLLM_KERNEL_CONFIGS=tuned.json`` makes the kernels use such a file without editing
the code; with ``FLASHLLM_RETUNE=1`` as well, a shape with no entry is timed on its first call (a
stall of about a second, opt-in) and its winner appended to the file. A user's first call never
autotunes otherwise: a missing key falls back to `default_config`.

Lookup order: ``TUNED[(arch, format, shape_class, n_bucket, band)]``, the same with shape class
``"*"``, then `default_config` (with a one-time warning on architectures outside `RULE_FITTED`);
``FLASHLLM_KERNEL_OPTIONS`` (e.g. ``fixup`` or ``bitmap:fit``) then forces options on the result
(`forced_options`).
``split_k == 0`` means "choose at launch from the occupancy" (see `auto_split_k`), so a wildcard
entry serves every layer shape.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Optional


def getenv(name: str) -> Optional[str]:
    """`os.environ.get(name)`, in a fifth of its time where the variable is unset (the usual case):
    the mapping's `get` raises and catches two KeyErrors for a missing name (~1.5 µs on a 2-core
    CPU), and every eager kernel call reads three settings (`launch_settings`, the first-use check)."""
    data = getattr(os.environ, "_data", None)
    if data is None:  # not CPython's mapping: the public way
        return os.environ.get(name)
    value = data.get(os.environ.encodekey(name))
    return None if value is None else os.environ.decodevalue(value)


NROWS = (8, 16, 32, 64, 128)
N_BUCKETS = (1, 8, 16, 32, 64, 128, 256)
M_BOUNDS = (4096, 8192, 16384, 32768)
K_BOUNDS = (8192, 16384)
BANDS = ((0.6, "50"), (0.75, "70"), (0.85, "80"), (1.01, "90"))
# Above this many activation rows the weight is decoded once and multiplied by one dense GEMM:
# the fused kernels' tensor-core work grows with N (mma.sync, each warp re-reading the
# activations) and they fall behind. On an H200 (2026-11-27, 18 layers, 70 and 90%; geomeans)
# they ran at 0.56-0.70x of cuBLAS at N = 64, well ahead of expansion + cuBLAS, and at
# 0.33-0.42x at N = 128, where the expansion kernels' measured bandwidth puts expansion + cuBLAS
# ahead for Tiled-CSL on 33 of 36 points (1.17x) and level for bitmap (0.98x; 1.2x ahead once its
# expansion reaches 75% of copy bandwidth). Interpolated, the times cross at N = 100-110 (bitmap
# with its one-tile expansion kernel: at 128 or later; scripts/crossover_estimate.py, BENCHMARKS.md,
# eighteenth session); 256, the first setting, sent N = 113-256 to the slower path.
MAX_FAST_N = int(os.environ.get("FLASHLLM_KERNEL_MAX_N", "112"))
# There, the weight is expanded by one CUDA kernel per format (cuda/*_expand.cu: one pass, the
# compressed bytes in and the dense bytes out) instead of the reference decode's torch passes:
# validated on an H200 on 2026-11-27 (their GPU tests, bit for bit against to_dense, memcheck and
# racecheck clean), 40-60 us for an 11008 x 4096 weight where the reference decode takes 0.5-4 ms.
# FLASHLLM_EXPAND=0 turns them off (FLASHLLM_EXPAND=1 forces them where EXPAND_VALIDATED is off).
EXPAND_VALIDATED = True
EXPAND_ENV = "FLASHLLM_EXPAND"


def expand_enabled() -> bool:
    """Whether prefill-sized products expand the weight with the formats' CUDA kernels."""
    flag = os.environ.get(EXPAND_ENV, "")
    if flag not in ("", "0", "1"):
        raise ValueError(f"{EXPAND_ENV}={flag!r}: use 1 (expand with the CUDA kernels) or 0 (the reference decode)")
    return flag == "1" or (flag == "" and EXPAND_VALIDATED)


MAX_AUTO_SPLIT = 16
# How the bitmap kernel expands a tile (cuda/bitmap_spmm.cu, FLASHLLM_DECODE = index here):
# "fragment" builds each lane's tensor-core fragment from the masks with popcounts, a fixed cost per
# element (measured on an H200, the default); "scatter" walks each mask word's set bits into a
# zeroed shared-memory tile and reads it with ldmatrix, a cost per non-zero.
DECODES = ("fragment", "scatter")
# Warps per Tiled-CSL block (the bitmap kernel is written for 4): 8 puts twice the warps in flight
# on the same shared memory, for a kernel that is latency-bound at 3 resident blocks per SM.
CSL_WARPS = (4, 8)
# Tiled-CSL's CUDA-core path for one activation row (`LaunchConfig.cores`, FLASHLLM_CORES): where
# the per-lane fp32 row sums live.
CORE_SUMS = {0: "off (tensor cores)", 1: "shared by the block's warps", 2: "one array per warp"}
# Dense shared-memory tiles per Tiled-CSL block (cuda/tiled_csl_spmm.cu, FLASHLLM_DENSE_TILES): 2
# scatter the next tile while the tensor cores read this one (one barrier per tile, but the tile
# scattered ahead holds a stage: `stages - 2` tiles in flight); 1 scatters, synchronizes and reads
# one tile (two barriers, `stages - 1` in flight, 16 KB less shared memory).
CSL_DENSE_TILES = (2, 1)
# Values a bitmap stage buffer holds per strip (cuda/bitmap_spmm.cu, FLASHLLM_VALCAP). The kernel
# is latency-bound and its stage buffers, sized for a full 64 x 64 tile, set how many blocks are
# resident: `LaunchConfig.value_cap = FIT` sizes them to the weight's largest tile instead, the
# smallest of these that holds it (at 50% sparsity 2560 values, 9 blocks per SM instead of 6 at
# N = 16; from 70% 1536 or less). 0 (the default) is a full tile, 4096 values.
VALUE_CAPS = (1024, 1536, 2048, 2560, 3072, 4096)
FULL_TILE, FIT = 0, -1
# Bitmap tiles per pipeline stage (FLASHLLM_TPS): 2 shares each stage's wait, barrier and commit.
TILES_PER_STAGE = (1, 2)
# L2 prefetch distance (both kernels, FLASHLLM_PREFETCH in cuda/common.cuh): thread 0 asks L2 to
# fetch the compressed weight of the tile this many tiles past the shared-memory copies, one tile
# per stage, so a block has more weight bytes in flight than its stages hold (the measured speedups
# stay flat from 70% sparsity, where the shipped launches keep 13-35 KB in flight per SM;
# BENCHMARKS.md). 0 = none.
MAX_PREFETCH = 16
# Options compiled (and, for the decode, emulated) but not yet run on a GPU, by their names in
# KERNEL_OPTIONS: `flashllm bench kernels --tune` offers them (its GPU run is where they get
# validated), the library's FLASHLLM_RETUNE path does not, and nothing selects them by default.
# Remove a name once scripts/device_check.sh has passed with it (its step 2b smoke-tests exactly
# these). Validated: the scatter decode and 8-warp Tiled-CSL blocks on an H200 on
# 2026-11-26; fitted bitmap buffers ("fit"), one dense Tiled-CSL tile ("dense1"), the L2 prefetch
# ("prefetch") and the split-K ended by the last block ("fixup", FLASHLLM_FIXUP in cuda/common.cuh:
# the last block of each output tile to arrive rounds it and re-zeroes its workspace, one launch
# instead of a memset, the split blocks and a finalize launch) on 2026-11-27 (smoke tests, 430 GPU
# tests, memcheck, racecheck). Measured then under the configured launch (BENCHMARKS.md): fit
# 0.99-1.03x, dense1 1.03-1.11x, prefetch 0.93-0.98x, fixup 0.86-1.00x on the bitmap kernel
# (0.97-1.06x on Tiled-CSL; its fences and the last block's pass cost more than the two launches
# they save), so the default rule uses fit from 75% and one dense tile; the tuner offers all four.
# Validated on an H200 on 2026-11-27 (eleventh session: smoke tests, 600 GPU tests, memcheck,
# racecheck), written in the ninth and tenth sessions to test what the stream's per-tile time waits
# for; none is faster than the configured launch (geomean over Llama-2-7B up and OPT-66B qkv, N 1/16,
# 50-90%, BENCHMARKS.md eleventh session: default 1.135x cuBLAS, persistent 1.07x, ring 1.10x,
# rezero 1.11x, bulk 1.12x, tps2 0.95x, persistent + fixup 1.06x), so the rule uses none and the
# tuner offers all:
# - "persistent": stream-K bitmap blocks (FLASHLLM_PERSISTENT in cuda/bitmap_spmm.cu): as many
#   blocks as are resident at once, each an equal share of the strip-major tile sequence, its
#   pipeline carried across strip boundaries, every strip's sums added into the split-K workspace
#   (`persistent_ranges`): one pipeline fill per resident slot, no partial last wave. With `fixup`
#   too, the block that completes a strip's count of tiles rounds it: one launch per product.
# - "ring": the bitmap tiles' run bounds in a shared-memory ring that cp.async fills 2 (stages - 1)
#   tiles ahead (FLASHLLM_OFFSET_RING), instead of a dependent register load one iteration ahead.
# - "rezero": split-K's finalize launch writes zeros back into a workspace kept per stream
#   (splitk_finalize.cu, FLASHLLM_REZERO), so no memset runs before each product.
# - "bulk": the bitmap tiles' masks and value runs moved by Hopper's bulk copies (TMA, one thread,
#   per-stage mbarriers; FLASHLLM_BULK) instead of every thread's 16-byte cp.async chunks; sm_90
#   and up (below it the same build runs the cp.async path).
# - "tps": two bitmap tiles per pipeline stage (FLASHLLM_TPS), one wait, barrier and commit per two
#   tiles.
# What binds the kernel instead (Nsight Compute, same run): the L1/shared-memory pipe (79-84% of
# its peak, stalls on shared-memory results first) and instruction issue, not DRAM.
# Validated on an H200 on 2026-11-27 (sixteenth session: smoke tests, 656 GPU tests, memcheck,
# racecheck), written in the fourteenth, and slower than the configured tensor-core launch at every
# sparsity (the 18 issue layers at N = 1, geomean time ratio configured / option: cores 0.35-0.70x,
# cores_warp 0.65-0.82x from 50 to 90%; BENCHMARKS.md), so the rule uses neither and the tuner
# offers both at N = 1:
# - "cores" and "cores_warp": Tiled-CSL products of one activation row (a decode step at batch 1)
#   on the CUDA cores from the words, no dense tile (FLASHLLM_CORES in cuda/tiled_csl_spmm.cu): work
#   per non-zero instead of per element (BENCHMARKS.md, fourteenth session); fp32 sums per lane
#   shared by the block's warps (compare-and-swap adds), or per warp (plain adds, 4x the memory).
# Written in the seventeenth session (no GPU): compiled, counted and emulated, never run:
# - "wgmma": the tensor cores as Hopper's asynchronous warpgroup MMA (FLASHLLM_WGMMA, sm_90 only),
#   the activations read from shared memory once per block: Tiled-CSL's dense tile read from shared
#   memory too, the next tile's scatter overlapping the tensor cores; the bitmap kernel's decoded
#   fragments passed in registers, each k16 step's product overlapping the next step's decode.
# Written in the nineteenth session (no GPU): compiled, counted, tested on the fake driver, never run:
# - "pdl": programmatic dependent launch (FLASHLLM_PDL, sm_90 and later): the kernel may start while
#   the one before it in the stream finishes, asks L2 for its first tiles, and waits for it before
#   reading anything; it lets the next kernel start during its epilogue; split-K ends in a finalize
#   launch made the same way, on a workspace kept zero (no memset, which would break the chain).
UNVALIDATED: frozenset[str] = frozenset({"wgmma", "pdl"})
# Formats whose CUDA kernel has not run on a GPU yet (tiled_csl16, written in the twentieth
# session): scripts/device_check.sh smoke-tests each the way it does a pending option
# (`pending_options`, under the format's own name) and leaves a failing one out of its later steps;
# their GPU tests are marked `unvalidated_<format>`. Remove a name once its GPU run has passed.
PENDING_FORMATS: frozenset[str] = frozenset({"tiled_csl16"})

# Shared-memory layout constants, mirrored from the .cu files (the kernels trap if the launch
# provides less shared memory than they lay out, so a drift shows as an error, not as corruption).
_XS_STRIDE_BYTES = 144
_BITMAP_MASK_BYTES = 512
_BITMAP_TILE_BYTES = 64 * 64 * 2
_BITMAP_RING_BYTES = 16 * 4  # per strip: RING run bounds (offset_ring)
_CSL_DENSE_BYTES = (8192 + 8) * 2
_CSL_WGMMA_DENSE_BYTES = -(-_CSL_DENSE_BYTES // 1024) * 1024  # `wgmma`: padded to 1024 bytes
_WGMMA_SLACK = 1024  # `wgmma`: the layout starts at the block's first 1024-byte boundary
_CSL_CORE_SUMS_BYTES = 128 * 32 * 4  # `cores`: per-lane fp32 sums of the tile's 128 rows
# tiled_csl16: activation rows staged per chunk (x_rows / nrows tiles of nrows 144-byte rows)
CSL16_X_ROWS = (128, 64)
_CSL16_DENSE_BYTES = 1024 * 2 + 16  # tiled_csl16: a warp's 16 x 64 tile and the sentinel's slot
# tiled_csl16 (cuda/tiled_csl16_spmm.cu, written in the twentieth session, not yet run on a GPU):
# words per warp stage, a multiple of 32; an over-full tile scatters the rest from global memory.
CSL16_WORDS = (64, 1024)


@dataclass(frozen=True)
class LaunchConfig:
    nrows: int  # activation rows per block; N is padded up to it, larger N runs blocks along N
    strips: int = 1  # bitmap: 64-row strips per block (1 or 2); Tiled-CSL: 1 (its strip is 128 rows)
    stages: int = 3  # cp.async pipeline depth
    split_k: int = 0  # blocks along K per strip; 0 = from the occupancy at launch (auto_split_k)
    words_per_stage: int = 0  # Tiled-CSL: words per stage buffer; denser tiles load the rest in pieces
    decode: str = "fragment"  # bitmap: "fragment" (lanes assemble fragments) or "scatter" (see DECODES)
    warps: int = 4  # warps per block: bitmap 4; Tiled-CSL 4 or 8 (see CSL_WARPS)
    value_cap: int = FULL_TILE  # bitmap: values per stage buffer; FIT = fitted at launch (VALUE_CAPS)
    dense_tiles: int = 2  # Tiled-CSL: dense shared-memory tiles (CSL_DENSE_TILES); bitmap: 2 (unused)
    prefetch: int = 0  # tiles past the copies whose weight L2 is asked to fetch (MAX_PREFETCH); 0 = none
    fixup: bool = False  # split-K: the last block of an output tile rounds it (no memset, no finalize)
    persistent: bool = False  # bitmap: stream-K, one block per resident slot over the flattened tiles
    offset_ring: bool = False  # bitmap: run bounds fetched into a shared ring 2 (stages - 1) tiles ahead
    rezero: bool = False  # split-K: the finalize launch re-zeroes a kept workspace (no memset per product)
    bulk_copy: bool = False  # bitmap: the weight's bytes by bulk copies (TMA) from sm_90, not cp.async chunks
    tiles_per_stage: int = 1  # bitmap: tiles per pipeline stage (TILES_PER_STAGE), one barrier per stage
    cores: int = 0  # Tiled-CSL: N = 1 on the CUDA cores from the words, no dense tile (CORE_SUMS; 4 warps, nrows 8)
    wgmma: bool = False  # sm_90: Hopper's warpgroup MMA (Tiled-CSL 4 warps, 2 dense tiles; bitmap 1 strip, fragments)
    pdl: bool = False  # sm_90 and later: programmatic dependent launch (overlaps the previous kernel's tail)
    x_rows: int = 128  # tiled_csl16: activation rows staged per chunk (CSL16_X_ROWS; 64: 9 KB less per block)

    def validate(self, fmt: str) -> "LaunchConfig":
        if self.nrows not in NROWS:
            raise ValueError(f"nrows must be one of {NROWS}, got {self.nrows}")
        if self.split_k < 0:
            raise ValueError(f"split_k must be >= 0 (0 = automatic), got {self.split_k}")
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {self.decode!r}")
        if not 0 <= self.prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be 0..{MAX_PREFETCH} tiles, got {self.prefetch}")
        for flag in ("fixup", "persistent", "offset_ring", "rezero", "bulk_copy", "wgmma", "pdl"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.cores not in CORE_SUMS:
            raise ValueError(f"cores must be one of {tuple(CORE_SUMS)} ({CORE_SUMS}), got {self.cores!r}")
        if self.cores and fmt != "tiled_csl":
            raise ValueError(f"the CUDA-core path (cores) is a Tiled-CSL option, got {self} for {fmt}")
        if self.wgmma and (self.prefetch or (
                fmt == "tiled_csl" and (self.warps != 4 or self.dense_tiles != 2 or self.cores)) or (
                fmt == "bitmap" and (self.strips != 1 or self.decode != "fragment" or self.persistent
                                     or self.offset_ring or self.bulk_copy or self.tiles_per_stage != 1))):
            raise ValueError(f"the warpgroup MMA (wgmma) runs no L2 prefetch; for Tiled-CSL 4 warps (one "
                             f"warpgroup), two dense tiles and not the CUDA-core path; for bitmap one strip, the "
                             f"fragment decode and the plain pipeline; got {self} for {fmt}")
        if self.bulk_copy and fmt not in ("bitmap", "tiled_csl16"):
            raise ValueError(f"bulk copies of the weight are a bitmap and tiled_csl16 option, got {self} for {fmt}")
        if self.tiles_per_stage not in TILES_PER_STAGE or (self.tiles_per_stage > 1 and fmt != "bitmap"):
            raise ValueError(f"tiles_per_stage must be one of {TILES_PER_STAGE} (more than 1: bitmap only), got {self} "
                             f"for {fmt}")
        if self.tiles_per_stage > 1 and (self.offset_ring or self.bulk_copy or self.persistent or self.prefetch):
            raise ValueError(f"several tiles per stage run the plain pipeline: not with the ring, bulk copies, "
                             f"stream-K blocks or the prefetch; got {self}")
        if self.rezero and self.fixup:
            raise ValueError("rezero and fixup are two ways to end split-K without a memset: pick one")
        if self.offset_ring and fmt != "bitmap":
            raise ValueError(f"the offset ring is a bitmap option, got {self} for {fmt}")
        if self.persistent and (fmt != "bitmap" or self.strips != 1):
            raise ValueError(f"persistent blocks are a bitmap option, with one strip per block; got {self} for {fmt}")
        if fmt == "bitmap":
            if self.strips not in (1, 2) or (self.strips == 2 and self.nrows > 64):
                raise ValueError(f"bitmap strips must be 1, or 2 with nrows <= 64; got {self}")
            if not 2 <= self.stages <= 6:
                raise ValueError(f"bitmap stages must be 2..6, got {self.stages}")
            if self.warps != 4:
                raise ValueError(f"the bitmap kernel runs 4 warps per block, got warps={self.warps}")
            if self.value_cap not in (FULL_TILE, FIT, *VALUE_CAPS):
                raise ValueError(f"bitmap value_cap must be 0 (a full tile), {FIT} (fitted) or one of "
                                 f"{VALUE_CAPS}, got {self.value_cap}")
            if self.dense_tiles != 2:
                raise ValueError(f"dense_tiles is a Tiled-CSL option, got {self.dense_tiles} for bitmap")
        elif fmt == "tiled_csl":
            if self.nrows > 64 or self.strips != 1 or self.decode != "fragment" or self.value_cap != FULL_TILE:
                raise ValueError(f"Tiled-CSL needs nrows <= 64, strips == 1, the default decode and value_cap, "
                                 f"got {self}")
            if self.warps not in CSL_WARPS:
                raise ValueError(f"Tiled-CSL warps must be one of {CSL_WARPS}, got {self.warps}")
            if self.dense_tiles not in CSL_DENSE_TILES:
                raise ValueError(f"Tiled-CSL dense_tiles must be one of {CSL_DENSE_TILES}, got {self.dense_tiles}")
            if self.cores and (self.nrows != 8 or self.warps != 4 or self.dense_tiles != 2):
                raise ValueError(f"the CUDA-core Tiled-CSL path (cores) runs nrows=8, 4 warps and no dense tile "
                                 f"(dense_tiles left at its default), got {self}")
            low = 3 if self.dense_tiles == 2 and not self.cores else 2  # scattering ahead holds one stage
            if not low <= self.stages <= 6:
                raise ValueError(f"Tiled-CSL stages must be {low}..6 with dense_tiles={self.dense_tiles}"
                                 f"{' and cores' if self.cores else ''}, got {self.stages}")
            w = self.words_per_stage
            if w % 4 or not 256 <= w <= 8192:
                raise ValueError(f"Tiled-CSL words_per_stage must be a multiple of 4 in 256..8192, got {w}")
        elif fmt == "tiled_csl16":
            if (self.nrows > 64 or self.strips != 1 or self.decode != "fragment" or self.value_cap != FULL_TILE
                    or self.dense_tiles != 2):
                raise ValueError(f"tiled_csl16 needs nrows <= 64 and strips, decode, value_cap and dense_tiles left "
                                 f"at their defaults, got {self}")
            if self.prefetch or self.fixup or self.rezero or self.wgmma or self.pdl:
                raise ValueError(f"the tiled_csl16 kernel has none of the prefetch, fixup, rezero, wgmma or pdl "
                                 f"options, got {self}")
            if self.warps not in CSL_WARPS:
                raise ValueError(f"tiled_csl16 warps must be one of {CSL_WARPS}, got {self.warps}")
            if not 2 <= self.stages <= 6:
                raise ValueError(f"tiled_csl16 stages must be 2..6, got {self.stages}")
            if self.x_rows not in CSL16_X_ROWS or self.x_rows < self.nrows:
                raise ValueError(f"tiled_csl16 x_rows must be one of {CSL16_X_ROWS} and at least nrows, got {self}")
            w, (low, high) = self.words_per_stage, CSL16_WORDS
            if w % 32 or not low <= w <= high:
                raise ValueError(f"tiled_csl16 words_per_stage (per warp) must be a multiple of 32 in {low}..{high}, "
                                 f"got {w}")
        else:
            raise ValueError(f"no CUDA kernel for format {fmt!r}")
        if self.x_rows != 128 and fmt != "tiled_csl16":
            raise ValueError(f"x_rows is a tiled_csl16 option, got {self} for {fmt}")
        return self

    def defines(self, fmt: str) -> dict[str, int]:
        """The kernel's compile-time parameters; FLASHLLM_SMEM_BYTES makes the compiler check that
        the shared memory the launch will provide is exactly what the kernel lays out."""
        d = {"FLASHLLM_NROWS": self.nrows, "FLASHLLM_STAGES": self.stages,
             "FLASHLLM_SMEM_BYTES": self.smem_bytes(fmt)}
        if self.prefetch:  # left out at 0, the kernels' default, so the cache keys stay the same
            d["FLASHLLM_PREFETCH"] = self.prefetch
        if self.fixup:  # likewise
            d["FLASHLLM_FIXUP"] = 1
        if self.persistent:  # likewise
            d["FLASHLLM_PERSISTENT"] = 1
        if self.offset_ring:  # likewise
            d["FLASHLLM_OFFSET_RING"] = 1
        if self.bulk_copy:  # likewise
            d["FLASHLLM_BULK"] = 1
        if self.tiles_per_stage > 1:  # likewise
            d["FLASHLLM_TPS"] = self.tiles_per_stage
        if self.wgmma:  # likewise
            d["FLASHLLM_WGMMA"] = 1
        if self.pdl:  # likewise
            d["FLASHLLM_PDL"] = 1
        if fmt == "bitmap":
            d["FLASHLLM_STRIPS"] = self.strips
            d["FLASHLLM_DECODE"] = DECODES.index(self.decode)
            if self.value_cap == FIT:
                raise ValueError("value_cap=FIT is chosen per weight: resolve it with fitted() before compiling")
            if self.value_cap not in (FULL_TILE, 4096):  # a full tile keeps the kernel's default and cache key
                d["FLASHLLM_VALCAP"] = self.value_cap
        else:
            d["FLASHLLM_CAPW"] = self.words_per_stage
            if self.warps != 4:  # the kernels' default; leaving it out keeps the 4-warp cache keys
                d["FLASHLLM_WARPS"] = self.warps
            if self.dense_tiles != 2:  # likewise
                d["FLASHLLM_DENSE_TILES"] = self.dense_tiles
            if self.cores:  # likewise
                d["FLASHLLM_CORES"] = int(self.cores)
            if self.x_rows != 128:  # likewise
                d["FLASHLLM_XROWS"] = self.x_rows
        return d

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def validated(self) -> bool:
        """Whether every option has passed the GPU tests (see UNVALIDATED)."""
        return not unvalidated_options(self)

    def fitted(self, largest_run: Optional[int]) -> "LaunchConfig":
        """With value_cap=FIT, the config whose stage buffers hold `largest_run` values (the
        weight's longest tile run), or a full tile when that is unknown (None) or needs it."""
        if self.value_cap != FIT:
            return self
        cap = next((c for c in VALUE_CAPS if largest_run is not None and c >= largest_run), 4096)
        return replace(self, value_cap=FULL_TILE if cap == 4096 else cap)

    def smem_bytes(self, fmt: str) -> int:
        x_stage = self.nrows * _XS_STRIDE_BYTES
        if fmt == "bitmap":
            values = self.value_cap if self.value_cap > 0 else 4096  # FIT: at most a full tile
            stage = self.strips * (_BITMAP_MASK_BYTES + (values + 8) * 2) + x_stage
            # After the stages: the fragment decode's per-warp table, or the scatter's dense tiles.
            decode = 4 * self.strips * 32 * 8 if self.decode == "fragment" else self.strips * _BITMAP_TILE_BYTES
            ring = self.strips * _BITMAP_RING_BYTES if self.offset_ring else 0
            barriers = self.stages * 8 if self.bulk_copy else 0  # one mbarrier per stage
            flag = 16 if self.persistent and self.fixup else 0  # stream-K's own last-block flag
            if self.wgmma:  # a stage starts with its 128-byte activation rows, padded to 1024 bytes
                stage = -(-(self.nrows * 128 + _BITMAP_MASK_BYTES + (values + 8) * 2) // 1024) * 1024
                return _WGMMA_SLACK + self.stages * stage + decode
            return self.stages * self.tiles_per_stage * stage + decode + ring + barriers + flag
        if fmt == "tiled_csl16":  # the activation chunk, then per warp two dense tiles and its stages
            x_chunk = self.x_rows * _XS_STRIDE_BYTES
            bars = -(-self.stages * 8 // 16) * 16 if self.bulk_copy else 0  # a warp's mbarriers, 16-byte padded
            return x_chunk + self.warps * (2 * _CSL16_DENSE_BYTES + self.stages * self.words_per_stage * 4 + bars)
        stage = self.words_per_stage * 4 + x_stage
        if self.cores:  # no dense tile; the per-lane sums (per warp with 2) after the run bounds, 16-aligned
            arrays = self.warps if self.cores == 2 else 1
            return self.stages * stage + -(-self.stages * 8 // 16) * 16 + arrays * _CSL_CORE_SUMS_BYTES
        if self.wgmma:  # 1024-byte aligned operands: padded dense tiles, unpadded 128-byte activation rows
            stage = self.words_per_stage * 4 + self.nrows * 128
            return _WGMMA_SLACK + self.dense_tiles * _CSL_WGMMA_DENSE_BYTES + self.stages * stage + self.stages * 8
        return self.dense_tiles * _CSL_DENSE_BYTES + self.stages * stage + self.stages * 8

    def rows_per_block(self, fmt: str) -> int:
        return {"bitmap": 64 * self.strips, "tiled_csl16": 16 * self.warps}.get(fmt, 128)

    def tile_rows_per_block(self, fmt: str) -> int:
        """Rows of the format's tile grid one block owns (the grid's blocks along M)."""
        return {"bitmap": self.strips, "tiled_csl16": self.warps}.get(fmt, 1)


# Kernel options by short name: the suffixes of `flashllm bench kernels --formats` entries
# ("bitmap:scatter", "tiled_csl:warps8", "bitmap:fit:stages6") and the entries of
# FLASHLLM_KERNEL_OPTIONS (`forced_options`). "fit" sizes bitmap stage buffers to the weight's
# largest tile (FIT), "dense1" runs one dense Tiled-CSL tile per block, "stages6" a 6-deep
# pipeline, "pf4" an L2 prefetch 4 tiles ahead, "fixup" ends split-K in the last block.
OPTION_SPELLINGS: dict[str, tuple[str, object]] = {
    **{d: ("decode", d) for d in DECODES}, **{f"warps{w}": ("warps", w) for w in CSL_WARPS},
    "fit": ("value_cap", FIT), **{f"dense{t}": ("dense_tiles", t) for t in CSL_DENSE_TILES},
    **{f"stages{s}": ("stages", s) for s in range(2, 7)},
    **{f"pf{p}": ("prefetch", p) for p in (0, 1, 2, 4, 8, 16)},
    "fixup": ("fixup", True),
    # K splits (a launch-time choice, not a build): split1 is one launch with no workspace, what
    # the split-K epilogue's launches cost shows against the configured split.
    **{f"split{k}": ("split_k", k) for k in (1, 2, 4, 8, 16, 32)},
    "persistent": ("persistent", True),
    "ring": ("offset_ring", True),
    "rezero": ("rezero", True),
    "bulk": ("bulk_copy", True),
    "tps2": ("tiles_per_stage", 2),
    "cores": ("cores", 1),
    "cores_warp": ("cores", 2),
    "wgmma": ("wgmma", True),
    "pdl": ("pdl", True),
    "x64": ("x_rows", 64),  # tiled_csl16's half activation chunk
}
FORCED_OPTIONS_ENV = "FLASHLLM_KERNEL_OPTIONS"
_forced: dict[str, dict[str, dict]] = {}


def example_config(fmt: str, options: dict) -> LaunchConfig:
    """`options` (LaunchConfig fields) applied to a representative launch of `fmt`: what options
    are checked on, and what says which pending options they run. Validated (`with_options`)."""
    words = {"tiled_csl": 2048, "tiled_csl16": 256}.get(fmt, 0)
    return with_options(LaunchConfig(nrows=16, words_per_stage=words), options, fmt)


def parse_options(fmt: str, names: Iterable[str]) -> dict:
    """Option names (OPTION_SPELLINGS) -> the LaunchConfig fields they set on a launch of `fmt`.
    Raises ValueError naming an unknown option, or the reason `fmt` cannot run the combination."""
    options: dict = {}
    for name in names:
        if name not in OPTION_SPELLINGS:
            raise ValueError(f"unknown option {name!r}; options are {sorted(OPTION_SPELLINGS)}")
        field, value = OPTION_SPELLINGS[name]
        options[field] = value
    if options:
        example_config(fmt, options)
    return options


def forced_options(fmt: str) -> dict:
    """The LaunchConfig fields that FLASHLLM_KERNEL_OPTIONS forces on every launch of format `fmt`
    (on top of the table or the rule), e.g. "fixup" (both formats) or "bitmap:fit,tiled_csl:dense1"
    (a format's own options): the way to run a whole model, `flashllm bench e2e` included, with an
    option for an A/B. Unknown names, and options a format cannot run, raise; options not yet
    validated on a GPU warn once."""
    text = os.environ.get(FORCED_OPTIONS_ENV, "").strip()
    if text not in _forced:
        names: dict[str, list[str]] = {"bitmap": [], "tiled_csl": [], "tiled_csl16": []}
        for entry in filter(None, (e.strip() for e in text.split(","))):
            target, _, name = entry.rpartition(":")
            if target not in ("", *names) or name not in OPTION_SPELLINGS:
                raise ValueError(f"{FORCED_OPTIONS_ENV}={text!r}: unknown entry {entry!r}; entries are an "
                                 f"option or format:option, options {sorted(OPTION_SPELLINGS)}, formats "
                                 f"{sorted(names)}")
            # An option named alone goes to the two kernels that share the options (tiled_csl16 has
            # next to none): "fixup" forces it on bitmap and Tiled-CSL.
            for f in (target,) if target else ("bitmap", "tiled_csl"):
                names[f].append(name)
        try:
            per_format = {f: parse_options(f, opts) for f, opts in names.items()}
        except ValueError as err:
            raise ValueError(f"{FORCED_OPTIONS_ENV}={text!r}: {err}") from None
        pending = sorted({n for f, opts in per_format.items() if opts
                          for n in unvalidated_options(example_config(f, opts))})
        if pending:
            warnings.warn(f"flashllm: {FORCED_OPTIONS_ENV}={text!r} forces options not yet validated on a GPU: "
                          f"{', '.join(pending)}", stacklevel=3)
        _forced[text] = per_format
    return _forced[text].get(fmt, {})


@dataclass(frozen=True)
class KernelOption:
    """A kernel option as validation tracks it: `name` (in UNVALIDATED, and the tests' marker
    `unvalidated_<name>`), whether a launch uses it, and the `flashllm bench kernels --formats`
    entries that run it under the configured launch."""

    name: str
    used_by: Callable[[LaunchConfig], bool]
    bench: tuple[str, ...]


KERNEL_OPTIONS: tuple[KernelOption, ...] = (
    *(KernelOption(d, lambda c, d=d: c.decode == d, (f"bitmap:{d}",)) for d in DECODES),
    *(KernelOption(f"warps{w}", lambda c, w=w: c.warps == w, (f"tiled_csl:warps{w}",)) for w in CSL_WARPS),
    KernelOption("fit", lambda c: c.value_cap != FULL_TILE, ("bitmap:fit",)),  # FIT, or a cap it resolved to
    *(KernelOption(f"dense{t}", lambda c, t=t: c.dense_tiles == t, (f"tiled_csl:dense{t}",))
      for t in CSL_DENSE_TILES),
    KernelOption("prefetch", lambda c: c.prefetch > 0, ("bitmap:pf4", "tiled_csl:pf4")),
    KernelOption("fixup", lambda c: c.fixup, ("bitmap:fixup", "tiled_csl:fixup")),
    KernelOption("persistent", lambda c: c.persistent, ("bitmap:persistent",)),
    KernelOption("ring", lambda c: c.offset_ring, ("bitmap:ring",)),
    KernelOption("rezero", lambda c: c.rezero, ("bitmap:rezero", "tiled_csl:rezero")),
    KernelOption("bulk", lambda c: c.bulk_copy, ("bitmap:bulk",)),
    KernelOption("tps", lambda c: c.tiles_per_stage > 1, ("bitmap:tps2",)),
    KernelOption("cores", lambda c: c.cores == 1, ("tiled_csl:cores",)),
    KernelOption("cores_warp", lambda c: c.cores == 2, ("tiled_csl:cores_warp",)),
    KernelOption("wgmma", lambda c: c.wgmma, ("bitmap:wgmma", "tiled_csl:wgmma")),
    KernelOption("pdl", lambda c: c.pdl, ("bitmap:pdl", "tiled_csl:pdl")),
)
OPTION_NAMES = tuple(o.name for o in KERNEL_OPTIONS)
assert UNVALIDATED <= set(OPTION_NAMES), UNVALIDATED - set(OPTION_NAMES)


def unvalidated_options(cfg: LaunchConfig) -> list[str]:
    """The names of `cfg`'s options that have not passed a GPU run yet (UNVALIDATED): a GPU run
    validates them one by one, and the tests mark each as `unvalidated_<name>`."""
    return [o.name for o in KERNEL_OPTIONS if o.name in UNVALIDATED and o.used_by(cfg)]


def pending_options() -> dict[str, list[str]]:
    """Each option still pending -> the `flashllm bench kernels --formats` entries that run it under
    the configured launch, and each pending format -> itself: scripts/device_check.sh smoke-tests
    each on its own by these, then benchmarks, probes and tunes only those that passed."""
    return {**{o.name: list(o.bench) for o in KERNEL_OPTIONS if o.name in UNVALIDATED},
            **{fmt: [fmt] for fmt in sorted(PENDING_FORMATS)}}


# What a GPU run validates one by one, by the names device_check.sh and the tests' markers use.
PENDING_NAMES = (*OPTION_NAMES, *sorted(PENDING_FORMATS))


# (arch, format, shape class or "*", n bucket, sparsity band) -> config.
_B, _C = "bitmap", "tiled_csl"
TUNED: dict[tuple[str, str, str, int, str], LaunchConfig] = {
    # Measured winners, NVIDIA H200, 2026-11-26 (`flashllm bench kernels --tune`, graph replay, L2
    # flushed): m16k-k8k from Llama-2-7B up_proj (11008 x 4096), m16k-k16k from OPT-66B out_proj
    # (9216 x 9216), m32k-k16k from OPT-66B qkv_proj (27648 x 9216), m8k-kbig from Llama-3-70B
    # down_proj (8192 x 28672). Bands 80 and 90 at N = 1 come from a run that also offered the
    # scatter decode and 8-warp Tiled-CSL blocks (bench-results/h200-2026-11-26b/tune.log); every
    # N = 16 entry from a run on the leaner kernels of the same day (h200-2026-11-26c). On those
    # kernels 8 warps beat 4 by 1.05-1.08x in the two Tiled-CSL N = 1, band-80 entries (same launch
    # otherwise; h200-2026-11-26c/kernels_fp16.csv), so they run 8.
    ("sm90", _B, "m16k-k16k", 1, "50"): LaunchConfig(nrows=8, stages=3, split_k=16),
    ("sm90", _B, "m16k-k16k", 1, "80"): LaunchConfig(nrows=8, stages=3, split_k=32),
    ("sm90", _B, "m16k-k16k", 1, "90"): LaunchConfig(nrows=8, stages=3, split_k=16, decode="scatter"),
    ("sm90", _B, "m16k-k16k", 16, "50"): LaunchConfig(nrows=16, stages=3, split_k=16),
    ("sm90", _B, "m16k-k16k", 16, "80"): LaunchConfig(nrows=16, stages=3, split_k=16),
    ("sm90", _B, "m16k-k16k", 16, "90"): LaunchConfig(nrows=16, stages=3, split_k=16),
    ("sm90", _B, "m16k-k16k", 64, "50"): LaunchConfig(nrows=64, stages=3, split_k=16),
    ("sm90", _B, "m16k-k16k", 64, "80"): LaunchConfig(nrows=64, stages=3, split_k=16),
    ("sm90", _B, "m16k-k8k", 1, "50"): LaunchConfig(nrows=8, stages=3, split_k=16),
    ("sm90", _B, "m16k-k8k", 1, "80"): LaunchConfig(nrows=8, stages=3, split_k=0),
    ("sm90", _B, "m16k-k8k", 1, "90"): LaunchConfig(nrows=8, stages=3, split_k=8, decode="scatter"),
    ("sm90", _B, "m16k-k8k", 16, "90"): LaunchConfig(nrows=16, stages=3, split_k=8),
    ("sm90", _B, "m16k-k8k", 64, "50"): LaunchConfig(nrows=64, stages=3, split_k=8),
    ("sm90", _B, "m16k-k8k", 64, "80"): LaunchConfig(nrows=64, stages=3, split_k=8),
    ("sm90", _B, "m32k-k16k", 16, "90"): LaunchConfig(nrows=16, stages=3, split_k=0, decode="scatter"),
    ("sm90", _B, "m8k-kbig", 16, "50"): LaunchConfig(nrows=16, stages=3, split_k=32),
    ("sm90", _B, "m8k-kbig", 16, "80"): LaunchConfig(nrows=16, stages=3, split_k=32),
    ("sm90", _B, "m8k-kbig", 16, "90"): LaunchConfig(nrows=16, stages=3, split_k=32),
    ("sm90", _C, "m16k-k16k", 1, "50"): LaunchConfig(nrows=8, stages=3, split_k=16, words_per_stage=3072),
    ("sm90", _C, "m16k-k16k", 1, "80"): LaunchConfig(nrows=8, stages=4, split_k=16, words_per_stage=2048, warps=8),
    ("sm90", _C, "m16k-k16k", 1, "90"): LaunchConfig(nrows=8, stages=4, split_k=32, words_per_stage=1024),
    ("sm90", _C, "m16k-k16k", 16, "50"): LaunchConfig(nrows=16, stages=3, split_k=0, words_per_stage=6144),
    ("sm90", _C, "m16k-k16k", 16, "80"): LaunchConfig(nrows=16, stages=3, split_k=0, words_per_stage=2048, warps=8),
    ("sm90", _C, "m16k-k16k", 16, "90"): LaunchConfig(nrows=16, stages=4, split_k=16, words_per_stage=1024),
    ("sm90", _C, "m16k-k16k", 64, "50"): LaunchConfig(nrows=64, stages=3, split_k=16, words_per_stage=4096),
    ("sm90", _C, "m16k-k16k", 64, "80"): LaunchConfig(nrows=64, stages=3, split_k=16, words_per_stage=1024),
    ("sm90", _C, "m16k-k8k", 1, "50"): LaunchConfig(nrows=8, stages=3, split_k=4, words_per_stage=3072),
    ("sm90", _C, "m16k-k8k", 1, "80"): LaunchConfig(nrows=8, stages=4, split_k=4, words_per_stage=2048, warps=8),
    ("sm90", _C, "m16k-k8k", 1, "90"): LaunchConfig(nrows=8, stages=4, split_k=4, words_per_stage=2048),
    ("sm90", _C, "m16k-k8k", 16, "90"): LaunchConfig(nrows=16, stages=3, split_k=4, words_per_stage=1024),
    ("sm90", _C, "m16k-k8k", 64, "50"): LaunchConfig(nrows=64, stages=3, split_k=8, words_per_stage=4096),
    ("sm90", _C, "m16k-k8k", 64, "80"): LaunchConfig(nrows=64, stages=3, split_k=0, words_per_stage=3072),
    ("sm90", _C, "m32k-k16k", 16, "90"): LaunchConfig(nrows=16, stages=3, split_k=0, words_per_stage=1024),
    ("sm90", _C, "m8k-kbig", 16, "50"): LaunchConfig(nrows=16, stages=3, split_k=4, words_per_stage=6144),
    ("sm90", _C, "m8k-kbig", 16, "80"): LaunchConfig(nrows=16, stages=3, split_k=0, words_per_stage=2048, warps=8),
    ("sm90", _C, "m8k-kbig", 16, "90"): LaunchConfig(nrows=16, stages=3, split_k=8, words_per_stage=1024),
    # Measured winners, NVIDIA H200, 2026-11-27 (bench-results/h200-2026-11-27/tune.log): the
    # kernels of that day, every option offered (fitted buffers, one dense tile, prefetch, fixup),
    # Llama-2-7B up_proj for m16k-k8k and OPT-66B qkv_proj for m32k-k16k, N = 8 / 16 / 32, 50 and
    # 80%. On the sweep of every issue shape they moved these two classes' speedups by 1.05x
    # (bitmap) and 1.10-1.14x (Tiled-CSL) at N 8-32 and the other classes by 1.01x (BENCHMARKS.md).
    ("sm90", _B, "m16k-k8k", 8, "50"): LaunchConfig(nrows=8, stages=3, split_k=4, value_cap=FIT, fixup=True),
    ("sm90", _B, "m16k-k8k", 8, "80"): LaunchConfig(nrows=8, stages=4, split_k=0, value_cap=FIT),
    ("sm90", _B, "m16k-k8k", 16, "50"): LaunchConfig(nrows=16, stages=3, split_k=16, value_cap=FIT),
    ("sm90", _B, "m16k-k8k", 16, "80"): LaunchConfig(nrows=16, stages=3, split_k=16, value_cap=FIT),
    ("sm90", _B, "m16k-k8k", 32, "50"): LaunchConfig(nrows=32, stages=3, split_k=4, value_cap=FIT),
    ("sm90", _B, "m16k-k8k", 32, "80"): LaunchConfig(nrows=32, stages=3, split_k=4, strips=2, value_cap=FIT),
    ("sm90", _B, "m32k-k16k", 8, "50"): LaunchConfig(nrows=8, stages=3, split_k=16, strips=2, value_cap=FIT),
    ("sm90", _B, "m32k-k16k", 8, "80"): LaunchConfig(nrows=8, stages=3, split_k=0, strips=2, value_cap=FIT),
    ("sm90", _B, "m32k-k16k", 16, "50"): LaunchConfig(nrows=16, stages=3, split_k=0, value_cap=FIT),
    ("sm90", _B, "m32k-k16k", 16, "80"): LaunchConfig(nrows=16, stages=3, split_k=16, strips=2, value_cap=FIT),
    ("sm90", _B, "m32k-k16k", 32, "50"): LaunchConfig(nrows=32, stages=3, split_k=0, strips=2, value_cap=FIT),
    ("sm90", _B, "m32k-k16k", 32, "80"): LaunchConfig(nrows=32, stages=3, split_k=0, strips=2, value_cap=FIT),
    ("sm90", _C, "m16k-k8k", 8, "50"): LaunchConfig(nrows=8, stages=3, split_k=16, words_per_stage=3072, dense_tiles=1),
    ("sm90", _C, "m16k-k8k", 8, "80"): LaunchConfig(nrows=8, stages=3, split_k=4, words_per_stage=2048, warps=8, fixup=True),
    ("sm90", _C, "m16k-k8k", 16, "50"): LaunchConfig(nrows=16, stages=3, split_k=8, words_per_stage=6144),
    ("sm90", _C, "m16k-k8k", 16, "80"): LaunchConfig(nrows=16, stages=3, split_k=16, words_per_stage=2048, warps=8, dense_tiles=1),
    ("sm90", _C, "m16k-k8k", 32, "50"): LaunchConfig(nrows=32, stages=3, split_k=4, words_per_stage=3072, dense_tiles=1),
    ("sm90", _C, "m16k-k8k", 32, "80"): LaunchConfig(nrows=32, stages=4, split_k=4, words_per_stage=2048, dense_tiles=1),
    ("sm90", _C, "m32k-k16k", 8, "50"): LaunchConfig(nrows=8, stages=3, split_k=32, words_per_stage=3072, dense_tiles=1),
    ("sm90", _C, "m32k-k16k", 8, "80"): LaunchConfig(nrows=8, stages=3, split_k=16, words_per_stage=2048, warps=8, dense_tiles=1),
    ("sm90", _C, "m32k-k16k", 16, "50"): LaunchConfig(nrows=16, stages=3, split_k=8, words_per_stage=6144),
    ("sm90", _C, "m32k-k16k", 16, "80"): LaunchConfig(nrows=16, stages=3, split_k=0, words_per_stage=2048, warps=8, dense_tiles=1),
    ("sm90", _C, "m32k-k16k", 32, "50"): LaunchConfig(nrows=32, stages=3, split_k=32, words_per_stage=3072, dense_tiles=1),
    ("sm90", _C, "m32k-k16k", 32, "80"): LaunchConfig(nrows=32, stages=3, split_k=0, words_per_stage=2048, dense_tiles=1),
}
# Architectures whose missing keys the default rules were fitted on: no "untuned" warning there;
# a format whose rule was fitted on no measurement (tiled_csl16: its kernel has not run) warns anywhere.
RULE_FITTED = {"sm90"}
UNTUNED_FORMATS = {"tiled_csl16"}


def arch_key(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}"


def pdl_capable(arch: str) -> bool:
    """Whether GPUs of `arch` have programmatic dependent launch: sm_90 and later. `arch` is an
    `arch_key` ("sm90") or an NVRTC target ("sm_90", "sm_90a"): the one rule for both."""
    return int(arch.removeprefix("sm").lstrip("_").rstrip("af")) >= 90


def shape_class(out_features: int, in_features: int) -> str:
    """Layers grouped by what changes the best launch: rows (parallelism along M) and depth (K)."""
    m = next((f"{b // 1024}k" for b in M_BOUNDS if out_features <= b), "big")
    k = next((f"{b // 1024}k" for b in K_BOUNDS if in_features <= b), "big")
    return f"m{m}-k{k}"


def n_bucket(n: int) -> int:
    return next((b for b in N_BUCKETS if n <= b), N_BUCKETS[-1])


def sparsity_band(sparsity: float) -> str:
    return next(name for bound, name in BANDS if sparsity < bound)


def nrows_for(n: int, fmt: str) -> int:
    cap = 128 if fmt == "bitmap" else 64
    return next((r for r in NROWS if n <= r and r <= cap), cap)


def default_config(fmt: str, n: int, sparsity: float) -> LaunchConfig:
    """The rule for keys missing from the table, fitted to the H200 runs of 2026-11-26 and -27: one
    strip per bitmap block and 3 stages (more resident blocks beat deeper pipelines); Tiled-CSL stages
    of 2-3K words even where denser tiles need a second load (the occupancy is worth more). From 85%
    sparsity and up to 16 rows the bitmap kernel scatters (1.03-1.19x the fragment decode; it loses
    below 85% and at N = 64), and between 75% and 85% a Tiled-CSL block of up to 16 rows runs 8
    warps (1.02-1.17x on the four benchmarked layers; at 90% 4 warps are ahead, 0.87-1.02x). From 75%
    the bitmap stage buffers are fitted to the weight (1.00-1.03x under this launch, and the pick of
    every bitmap entry the 2026-11-27 tuning wrote; at 50% 0.99x), and Tiled-CSL blocks hold one
    dense tile (1.03-1.11x at 50-90%, N = 1 and 16; the pick of 9 of its 12 tuned entries): both
    up to 32 rows, where they were measured."""
    nrows = nrows_for(n, fmt)
    if fmt == "bitmap":
        decode = "scatter" if sparsity >= 0.85 and nrows <= 16 else "fragment"
        fit = sparsity >= 0.75 and nrows <= 32
        return LaunchConfig(nrows=nrows, strips=1, stages=3, decode=decode, value_cap=FIT if fit else FULL_TILE)
    if fmt == "tiled_csl16":  # a warp stage holds a tile's run up to about its mean + 5 sd at the band's low end
        words = 608 if sparsity < 0.6 else 512 if sparsity < 0.75 else 320 if sparsity < 0.85 else 224
        return LaunchConfig(nrows=nrows, stages=4, words_per_stage=words, warps=4)
    words = 3072 if sparsity < 0.75 else 2048 if sparsity < 0.85 else 1536
    warps = 8 if nrows <= 16 and 0.75 <= sparsity < 0.85 else 4
    return LaunchConfig(nrows=nrows, stages=3, words_per_stage=words, warps=warps, dense_tiles=1 if nrows <= 32 else 2)


_overlay: Optional[dict[tuple, LaunchConfig]] = None
_warned_missing: set[tuple[str, str]] = set()


def _overlay_path() -> Optional[str]:
    return os.environ.get("FLASHLLM_KERNEL_CONFIGS") or None


def _load_overlay() -> dict[tuple, LaunchConfig]:
    global _overlay
    if _overlay is None:
        _overlay = {}
        path = _overlay_path()
        if path and os.path.isfile(path):
            _overlay = {key: cfg for key, cfg in read_table(path).items()}
    return _overlay


def lookup(arch: str, fmt: str, out_features: int, in_features: int, n: int,
           sparsity: float) -> Optional[LaunchConfig]:
    """The tuned entry for this call, or None."""
    nb, band, sc = n_bucket(n), sparsity_band(sparsity), shape_class(out_features, in_features)
    for table in (_load_overlay(), TUNED):
        for key in ((arch, fmt, sc, nb, band), (arch, fmt, "*", nb, band)):
            if key in table:
                return table[key]
    return None


def with_options(cfg: LaunchConfig, options: dict, fmt: str) -> LaunchConfig:
    """`cfg` with `options` (LaunchConfig fields) forced on it, validated. Stream-K blocks run one
    strip at a time, so forcing `persistent` on a two-strip launch makes it one strip per block
    (the ninth session's table has two-strip entries; the option used to fail there); `cores` brings
    its one geometry (8 activation rows, 4 warps, no dense tile)."""
    if options.get("persistent") and "strips" not in options:
        options = {**options, "strips": 1}
    if options.get("cores"):  # the CUDA-core path's one geometry, whatever the launch it is forced on had
        options = {"nrows": 8, "warps": 4, "dense_tiles": 2, **options}
    if options.get("wgmma") and fmt == "tiled_csl":  # one warpgroup, two dense tiles (3 stages at least)
        options = {"warps": 4, "dense_tiles": 2, "prefetch": 0, "stages": max(cfg.stages, 3), **options}
    elif options.get("wgmma"):  # one strip, the fragment decode, the plain pipeline
        options = {"strips": 1, "decode": "fragment", "prefetch": 0, "persistent": False, "offset_ring": False,
                   "bulk_copy": False, "tiles_per_stage": 1, **options}
    return replace(cfg, **options).validate(fmt)


def get_config(arch: str, fmt: str, out_features: int, in_features: int, n: int,
               sparsity: float) -> LaunchConfig:
    cfg = lookup(arch, fmt, out_features, in_features, n, sparsity)
    if cfg is None:
        if (arch not in RULE_FITTED or fmt in UNTUNED_FORMATS) and (arch, fmt) not in _warned_missing:
            _warned_missing.add((arch, fmt))
            warnings.warn(
                f"flashllm: no tuned {fmt} launch configuration for {arch}; using the default rule. "
                "Tune with `flashllm bench kernels --tune` (see flashllm/kernels/configs.py)",
                stacklevel=3,
            )
        cfg = default_config(fmt, n, sparsity)
    forced = forced_options(fmt)
    if forced.get("cores") and n > 1:  # the CUDA-core path multiplies one row: other N keep their launch
        forced = {k: v for k, v in forced.items() if k != "cores"}
    if forced.get("wgmma") and arch != "sm90":
        raise ValueError(f"{FORCED_OPTIONS_ENV}: the warpgroup MMA (wgmma) runs on sm_90 GPUs (H100, H200) only, "
                         f"not on {arch}")
    if forced.get("pdl") and not pdl_capable(arch):
        raise ValueError(f"{FORCED_OPTIONS_ENV}: programmatic dependent launch (pdl) needs sm_90 or later "
                         f"(H100, H200), not {arch}")
    if forced:
        try:
            cfg = with_options(cfg, forced, fmt)
        except ValueError as err:
            raise ValueError(f"{FORCED_OPTIONS_ENV}: {err}") from None
    # Entries are per bucket; a batch smaller than the bucket's nrows still fits, a larger one
    # (only possible for the last bucket) runs several blocks along N.
    return cfg.validate(fmt)


def auto_split_k(k_tiles: int, blocks_mn: int, slots: int, n: int, in_features: int,
                 bytes_per_element: float) -> int:
    """Blocks along K so that the grid fills every resident-block slot about four times over.

    On an H200 the tuner's winners were the deepest splits it offered (16) wherever each split
    kept a few tiles: the kernels are latency-bound and more blocks hide more of it. Capped at 16,
    at 4 tiles (256 columns) per split, and so that the fp32 partial sums the splits add (N x M x 4
    bytes each, in L2) stay under the weight's own bytes (M x K x bytes_per_element)."""
    want = -(-4 * slots // max(blocks_mn, 1))
    by_work = max(1, k_tiles // 4)
    by_bytes = max(1, int(in_features * bytes_per_element / (4 * max(n, 1))))
    return max(1, min(want, by_work, by_bytes, MAX_AUTO_SPLIT))


def persistent_blocks(total_tiles: int, slots: int, blocks_n: int) -> int:
    """Stream-K blocks along the tile sequence: the resident-block slots each of the `blocks_n`
    activation chunks gets (at least one block, at most one per tile)."""
    return max(1, min(total_tiles, slots // max(blocks_n, 1)))


def persistent_ranges(total_tiles: int, blocks: int) -> list[range]:
    """The strip-major tile indices (strip * K tiles + k tile) stream-K block b runs: [b T / G,
    (b + 1) T / G), as cuda/bitmap_spmm.cu computes them; none is empty while G <= T."""
    return [range(b * total_tiles // blocks, (b + 1) * total_tiles // blocks) for b in range(blocks)]


def candidates(fmt: str, n: int, sparsity: float, unvalidated: bool = False) -> list[LaunchConfig]:
    """What `--tune` and FLASHLLM_RETUNE time: the default and its neighbours (with `unvalidated`,
    also the options in UNVALIDATED). split_k is left at 0 here; the
    tuner crosses each with splits around the automatic choice."""
    base = default_config(fmt, n, sparsity)
    out = [base]

    def add(cfg: LaunchConfig) -> None:
        if cfg not in out and (unvalidated or cfg.validated()):
            out.append(cfg)

    if fmt == "bitmap":
        for decode in DECODES:
            for strips in (1, 2):
                for stages in (3, 4):
                    if strips == 1 or base.nrows <= 64:
                        add(replace(base, strips=strips, stages=stages, decode=decode))
            # Fitted value buffers: room for more blocks, or a deeper pipeline. From 75% a tile is
            # small (2.1 KB at 80%) and 2 tiles in flight per block leave ~25 KB of weight bytes in
            # flight per SM at 6 blocks, about what the DRAM latency needs (BENCHMARKS.md): 6 stages.
            for stages in (3, 4, 6) if sparsity >= 0.75 else (3, 4):
                add(replace(base, stages=stages, decode=decode, value_cap=FIT))
            if base.nrows <= 64:  # two strips (the higher static ceiling) in the room fitting frees
                add(replace(base, strips=2, stages=3, decode=decode, value_cap=FIT))
            # L2 prefetch: weight bytes in flight beyond the stages, at no shared-memory cost.
            add(replace(base, decode=decode, prefetch=4))
            add(replace(base, decode=decode, value_cap=FIT, prefetch=4))
        # The split-K ending in the last block: splitting gets cheaper, so the best split may move.
        add(replace(base, fixup=True))
        add(replace(base, value_cap=FIT, fixup=True))
        add(replace(base, rezero=True))  # or the memset saved by the finalize launch re-zeroing
        add(replace(base, value_cap=FIT, rezero=True))
        # Stream-K blocks (their split is the tile sequence's, so split_k does not matter to them),
        # ending split-K in the finalize launch or, with fixup, in the block that completes a strip.
        if base.strips == 1:
            add(replace(base, persistent=True))
            add(replace(base, value_cap=FIT, persistent=True))
            add(replace(base, value_cap=FIT, persistent=True, fixup=True))
        # Run bounds from a ring filled far ahead, alone and with the other latency options.
        add(replace(base, offset_ring=True))
        add(replace(base, value_cap=FIT, offset_ring=True))
        if base.strips == 1:
            add(replace(base, value_cap=FIT, offset_ring=True, persistent=True))
        # Bulk copies of the weight, alone, with fitted buffers and a deep pipeline, and with the ring.
        add(replace(base, bulk_copy=True))
        add(replace(base, value_cap=FIT, bulk_copy=True))
        if sparsity >= 0.75:
            add(replace(base, stages=6, value_cap=FIT, bulk_copy=True))
        add(replace(base, value_cap=FIT, offset_ring=True, bulk_copy=True))
        # Two tiles per stage: half the waits and barriers per tile, 2 or 3 stages of them.
        for stages in (2, 3):
            add(replace(base, stages=stages, value_cap=FIT, tiles_per_stage=2))
        # Hopper's warpgroup MMA (sm_90; on other GPUs its compile fails and the tuner skips it).
        wg = replace(base, strips=1, decode="fragment", prefetch=0, wgmma=True)
        for stages in (3, 4):
            for cap in (FULL_TILE, FIT):
                add(replace(wg, stages=stages, value_cap=cap))
        add(replace(wg, value_cap=FIT, fixup=True))
        # Programmatic dependent launch (sm_90 and later; elsewhere its compile fails and the tuner
        # skips it), on the default and on fitted buffers.
        add(replace(base, pdl=True))
        add(replace(base, value_cap=FIT, pdl=True))
    elif fmt == "tiled_csl16":
        for warps in CSL_WARPS:
            for stages in (3, 4, 6):
                for words in dict.fromkeys((base.words_per_stage, 256, 512)):
                    add(replace(base, stages=stages, words_per_stage=words, warps=warps))
        if base.nrows <= 32:  # the half chunk: 3 blocks of 8 warps per SM at 3 stages of 320 words, not 2
            for warps in CSL_WARPS:
                for stages in (3, 4):
                    add(replace(base, stages=stages, warps=warps, x_rows=64))
        # A tile's words by one bulk copy per warp (sm_90; elsewhere the same build copies by cp.async).
        for warps in CSL_WARPS:
            for stages in (3, 4, 6):
                add(replace(base, stages=stages, warps=warps, bulk_copy=True))
    else:
        for words in (1024, 2048, 3072, 4096, 6144):
            for stages in (3, 4):
                cfg = replace(base, stages=stages, words_per_stage=words, warps=4)
                if cfg.smem_bytes(fmt) <= 200 * 1024:
                    add(cfg)
        for words in dict.fromkeys((base.words_per_stage, 2048)):  # 8 warps: a few, not the grid
            add(replace(base, words_per_stage=words, warps=8))
        if sparsity >= 0.85:  # small tiles (3.3 KB at 90%): more of them in flight
            add(replace(base, stages=6, words_per_stage=1024, warps=4))
        # One dense tile (stages - 1 tiles in flight, 16 KB less) or two (stages - 2, one barrier
        # per tile), whichever the base has, and the L2 prefetch with either.
        for tiles in CSL_DENSE_TILES:
            for stages in (3, 4, 6) if sparsity >= 0.85 else (3, 4):
                add(replace(base, stages=stages, dense_tiles=tiles))
            add(replace(base, dense_tiles=tiles, prefetch=4))
        add(replace(base, fixup=True))
        add(replace(base, rezero=True))
        # Hopper's warpgroup MMA (sm_90; on other GPUs its compile fails and the tuner skips it): one
        # warpgroup, two dense tiles, the stage depths and buffers offered above.
        for stages in (3, 4):
            for words in dict.fromkeys((base.words_per_stage, 2048)):
                add(replace(base, stages=stages, words_per_stage=words, warps=4, dense_tiles=2, prefetch=0,
                            wgmma=True))
        add(replace(base, words_per_stage=2048, warps=4, dense_tiles=2, prefetch=0, wgmma=True, fixup=True))
        add(replace(base, pdl=True))  # programmatic dependent launch (as for bitmap)
        if n == 1:  # one activation row: the CUDA cores, from the words (no dense tile)
            core = replace(base, nrows=8, warps=4, dense_tiles=2, cores=1)
            for stages in (2, 3, 4):
                for words in (1024, 2048):
                    add(replace(core, stages=stages, words_per_stage=words))
            add(replace(core, prefetch=4))
            for stages, words in ((3, 2048), (4, 2048), (6, 1024)):  # two blocks per SM: deeper pipelines
                add(replace(core, cores=2, stages=stages, words_per_stage=words))
    return out


# ---------------------------------------------------------------------------------------------
# The JSON form written by a tune run and read through FLASHLLM_KERNEL_CONFIGS
# ---------------------------------------------------------------------------------------------
def read_table(path: str) -> dict[tuple, LaunchConfig]:
    with open(path, encoding="utf-8") as fh:
        rows = json.load(fh)
    table = {}
    for row in rows:
        key = (row["arch"], row["format"], row["shape_class"], int(row["n_bucket"]), str(row["band"]))
        table[key] = LaunchConfig(**row["config"]).validate(row["format"])
    return table


def write_table(path: str, table: dict[tuple, LaunchConfig]) -> None:
    rows = [
        {"arch": k[0], "format": k[1], "shape_class": k[2], "n_bucket": k[3], "band": k[4], "config": asdict(v)}
        for k, v in sorted(table.items())
    ]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=1)
    os.replace(tmp, path)


def remember(key: tuple, cfg: LaunchConfig) -> None:
    """Add a tuned entry for this process and, when FLASHLLM_KERNEL_CONFIGS names a file, to it."""
    global _remembered
    table = _load_overlay()
    table[key] = cfg
    _remembered += 1
    path = _overlay_path()
    if path:
        merge_into_file(path, {key: cfg})


def merge_into_file(path: str, entries: dict[tuple, LaunchConfig]) -> None:
    """Add `entries` to the JSON table at `path` (created if missing), replacing equal keys."""
    existing = read_table(path) if os.path.isfile(path) else {}
    existing.update(entries)
    write_table(path, existing)


def python_literal(table: dict[tuple, LaunchConfig]) -> str:
    """Entries formatted for pasting into `TUNED`."""
    lines = []
    for key, cfg in sorted(table.items()):
        fields = ", ".join(f"{k}={v!r}" for k, v in asdict(cfg).items())
        lines.append(f"    {key!r}: LaunchConfig({fields}),")
    return "\n".join(lines)


def key_for(arch: str, fmt: str, out_features: int, in_features: int, n: int, sparsity: float) -> tuple:
    return (arch, fmt, shape_class(out_features, in_features), n_bucket(n), sparsity_band(sparsity))


def tuning_candidates(fmt: str, n: int, sparsity: float, k_tiles: int, unvalidated: bool = False) -> list[LaunchConfig]:
    """`candidates` crossed with explicit split-K choices (0 = the automatic one; stream-K blocks
    split the tile sequence themselves, so they run once)."""
    splits = [0] + [s for s in (1, 2, 4, 8, 16, 32) if s <= k_tiles]
    return [replace(c, split_k=s) for c in candidates(fmt, n, sparsity, unvalidated)
            for s in (splits if not c.persistent else [0])]


def retune_requested() -> bool:
    return os.environ.get("FLASHLLM_RETUNE") == "1"


_remembered = 0  # entries `remember` added in this process


def launch_settings() -> tuple:
    """What the launch `get_config` picks depends on besides the product itself: the settings that
    retune or force options, the table loaded from FLASHLLM_KERNEL_CONFIGS and the entries tuning
    added. A launch kept for reuse (`cuda_op.LaunchPlan`) is reused only while these are the same."""
    return getenv("FLASHLLM_RETUNE"), getenv(FORCED_OPTIONS_ENV), id(_overlay), _remembered


# Each band's nominal sparsity: where shipped_variants resolves fitted buffers.
_BAND_SPARSITY = {"50": 0.5, "70": 0.7, "80": 0.8, "90": 0.9}


def typical_fit(cfg: LaunchConfig, sparsity: float) -> LaunchConfig:
    """`cfg` with FIT resolved as for a large layer of this (uniform) sparsity: its densest 64 x 64
    tile holds about the mean number of non-zeros plus 4.5 standard deviations."""
    density = 1.0 - sparsity
    largest = 4096 * density + 4.5 * math.sqrt(4096 * density * sparsity)
    return cfg.fitted(math.ceil(largest))


def shipped_variants() -> list[tuple[str, LaunchConfig]]:
    """Every (format, config) the table or the default rule can launch, split_k aside (a run-time
    argument) and fitted buffers resolved for the band's nominal sparsity (`typical_fit`; at run
    time the weight picks the cap): what scripts/compile_check.sh compiles."""
    seen: list[tuple[str, LaunchConfig]] = []
    tuned = [(k[1], v, _BAND_SPARSITY[k[4]]) for k, v in TUNED.items()]
    defaults = [(fmt, default_config(fmt, n, s), s) for fmt in ("bitmap", "tiled_csl", "tiled_csl16")
                for n in N_BUCKETS for s in (0.5, 0.7, 0.8, 0.9)]
    for fmt, cfg, sparsity in tuned + defaults:
        item = (fmt, typical_fit(replace(cfg, split_k=0), sparsity))
        if item not in seen:
            seen.append(item)
    return seen


# Fitted bitmap buffers compiled by the checks, one per code shape (the cap itself is a constant):
# at run time FIT picks the cap from the weight, so the GPU tests run these as FIT.
CHECKED_CAPS = ((8, 1, "fragment", 1536), (16, 1, "fragment", 2560), (16, 2, "fragment", 1024),
                (16, 1, "scatter", 1024), (32, 1, "fragment", 2048), (64, 1, "fragment", 3072),
                (128, 1, "fragment", 2560))
# One-dense-tile Tiled-CSL blocks compiled by the checks: (nrows, stages, words per stage, warps),
# the shapes tuning offers (2 stages, the least this pipeline takes, included).
CHECKED_SINGLE_DENSE = ((8, 3, 2048, 4), (16, 2, 1024, 4), (16, 4, 3072, 4), (16, 6, 1024, 4),
                        (16, 3, 2048, 8), (32, 3, 1024, 4), (64, 3, 4096, 4))
# L2-prefetching variants compiled by the checks, one per code shape the prefetch touches (the
# distance is a constant): bitmap (nrows, strips, decode, value cap), Tiled-CSL (nrows, warps,
# dense tiles), all at the tuner's distance of 4 tiles.
CHECKED_PREFETCH_BITMAP = ((8, 1, "fragment", 0), (16, 1, "fragment", 0), (16, 1, "scatter", 0),
                           (16, 2, "fragment", 0), (16, 1, "fragment", 1536), (64, 1, "fragment", 0))
CHECKED_PREFETCH_CSL = ((8, 4, 2), (16, 4, 2), (16, 8, 2), (16, 4, 1), (64, 4, 2))
# Variants ending split-K in the last block, one per epilogue shape (rows per block x NROWS, warps):
# bitmap (nrows, strips, decode), Tiled-CSL (nrows, warps, dense tiles).
CHECKED_FIXUP_BITMAP = ((8, 1, "fragment"), (16, 1, "fragment"), (16, 1, "scatter"), (16, 2, "fragment"),
                        (32, 1, "fragment"), (64, 1, "fragment"), (128, 1, "fragment"))
CHECKED_FIXUP_CSL = ((8, 4, 2), (16, 4, 2), (16, 8, 2), (16, 4, 1), (64, 4, 2))
# Stream-K bitmap variants, one per code shape the strip-boundary epilogue touches (rows, decode,
# value cap, prefetch, fixup: the strip ended by the block that completes it).
CHECKED_PERSISTENT = ((8, "fragment", 0, 0, False), (16, "fragment", 0, 0, False), (16, "scatter", 0, 0, False),
                      (32, "fragment", 1536, 0, False), (64, "fragment", 0, 0, False), (128, "fragment", 0, 0, False),
                      (16, "fragment", 0, 4, False), (8, "fragment", 0, 0, True), (16, "fragment", 0, 0, True),
                      (16, "scatter", 1536, 0, True), (64, "fragment", 0, 0, True), (128, "fragment", 0, 0, True))
# Bitmap variants with the run-bound ring: (rows, strips, stages, decode, value cap, stream-K); the
# 6-stage one has the ring's deepest look-ahead (10 tiles).
CHECKED_RING = ((8, 1, 3, "fragment", 0, False), (16, 1, 3, "fragment", 0, False), (16, 2, 3, "fragment", 0, False),
                (16, 1, 3, "scatter", 0, False), (16, 1, 6, "fragment", 1536, False), (32, 1, 3, "fragment", 0, True),
                (64, 1, 3, "fragment", 0, False), (128, 1, 3, "fragment", 0, False))
# Tiled-CSL's CUDA-core path (one activation row): (sums, stages, words per stage, fixup, prefetch),
# the stages and buffers tuning offers it (`candidates`), the last-block split-K and the L2 prefetch.
CHECKED_CORES = ((1, 3, 2048, False, 0), (1, 2, 1024, False, 0), (1, 4, 1024, False, 0), (1, 4, 4096, False, 0),
                 (1, 3, 2048, True, 0), (1, 3, 2048, False, 4), (2, 3, 2048, False, 0), (2, 6, 1024, False, 0),
                 (2, 3, 2048, True, 0))
# The warpgroup MMA (sm_90 only), every N shape it has (8 to 64 activation rows; the bitmap kernel
# also 128), a deeper pipeline and the last-block split-K: Tiled-CSL (rows, stages, words per stage,
# fixup), bitmap (rows, stages, value cap, fixup).
CHECKED_WGMMA = ((8, 3, 2048, False), (16, 3, 2048, False), (32, 3, 1024, False), (64, 3, 4096, False),
                 (16, 4, 3072, False), (8, 3, 2048, True), (16, 3, 1024, True))
CHECKED_WGMMA_BITMAP = ((8, 3, 0, False), (16, 3, 1536, False), (32, 3, 0, False), (64, 3, 2560, False),
                        (128, 3, 0, False), (16, 4, 1024, False), (8, 3, 0, True), (16, 3, 2048, True))
# Programmatic dependent launch (sm_90 and later), one per prologue it precedes and epilogue it
# follows: bitmap (rows, strips, decode, value cap, option), Tiled-CSL (rows, warps, dense tiles,
# option), the option one of "", "fixup", "persistent", "ring", "bulk", "tps2", "wgmma", "cores".
CHECKED_PDL_BITMAP = ((8, 1, "fragment", 1536, ""), (16, 1, "fragment", 0, ""), (16, 2, "fragment", 0, ""),
                      (16, 1, "scatter", 1024, ""), (64, 1, "fragment", 0, ""), (16, 1, "fragment", 0, "fixup"),
                      (16, 1, "fragment", 0, "persistent"), (16, 1, "fragment", 0, "ring"),
                      (16, 1, "fragment", 0, "bulk"), (16, 1, "fragment", 1536, "tps2"),
                      (16, 1, "fragment", 0, "wgmma"))
CHECKED_PDL_CSL = ((8, 4, 1, ""), (16, 4, 2, ""), (16, 8, 2, ""), (64, 4, 2, ""), (16, 4, 1, "fixup"),
                   (8, 4, 2, "cores"), (16, 4, 2, "wgmma"))
# tiled_csl16 with the half activation chunk (x_rows 64) or bulk copies of the words: (rows, stages,
# words per stage, warps, x_rows, bulk).
CHECKED_CSL16 = ((8, 3, 320, 8, 64, False), (16, 3, 320, 4, 64, False), (32, 4, 192, 8, 64, False),
                 (8, 4, 320, 4, 128, True), (16, 3, 224, 8, 128, True), (8, 2, 512, 4, 64, True),
                 (64, 6, 320, 4, 128, True))
# Bitmap variants with two tiles per stage: (rows, strips, stages, decode, value cap, fixup).
CHECKED_TPS = ((8, 1, 3, "fragment", 0, False), (16, 1, 2, "fragment", 0, False), (16, 1, 3, "fragment", 1536, False),
               (16, 2, 3, "fragment", 0, False), (16, 1, 3, "scatter", 0, False), (32, 1, 3, "fragment", 1024, False),
               (64, 1, 2, "fragment", 0, False), (16, 1, 3, "fragment", 0, True))
# Bitmap variants with bulk copies of the weight: (rows, strips, stages, decode, value cap, stream-K,
# ring, prefetch), one per code shape the copies touch (two strips: two copies of each kind per stage).
CHECKED_BULK = ((8, 1, 3, "fragment", 0, False, False, 0), (16, 1, 3, "fragment", 0, False, False, 0),
                (16, 2, 3, "fragment", 0, False, False, 0), (16, 1, 3, "scatter", 0, False, False, 0),
                (16, 1, 6, "fragment", 1024, False, False, 0), (16, 1, 6, "fragment", 1024, False, True, 0),
                (16, 1, 3, "fragment", 0, True, False, 0), (16, 1, 3, "fragment", 0, False, False, 4),
                (32, 1, 3, "fragment", 1536, False, False, 0), (64, 1, 3, "fragment", 0, False, False, 0),
                (128, 1, 3, "fragment", 0, False, False, 0))


def kernel_source(fmt: str) -> str:
    """The file, under kernels/cuda, of a format's product kernel (flashllm_<fmt>_spmm)."""
    return f"{fmt}_spmm.cu"


def checked_variants() -> list[tuple[str, LaunchConfig]]:
    """`shipped_variants` plus each with the other bitmap decodes or Tiled-CSL warp counts,
    bitmap variants with fitted value buffers, one-dense-tile Tiled-CSL blocks, L2-prefetching and
    last-block split-K variants of both, and the other options' code shapes (down to Tiled-CSL's
    CUDA-core path): what tuning may pick, what scripts/compile_check.sh compiles and the GPU tests
    run."""
    out = shipped_variants()
    two_strips = [("bitmap", LaunchConfig(nrows=16, strips=2, decode=d)) for d in DECODES]
    for fmt, cfg in list(out) + two_strips:  # two strips: a code shape the tuner may pick
        others = ([replace(cfg, decode=d) for d in DECODES] if fmt == "bitmap"
                  else [replace(cfg, warps=w) for w in CSL_WARPS])
        for item in ((fmt, c) for c in others):
            if item not in out:
                out.append(item)
    out += [("bitmap", LaunchConfig(nrows=n, strips=s, decode=d, value_cap=c)) for n, s, d, c in CHECKED_CAPS]
    out += [("tiled_csl", LaunchConfig(nrows=n, stages=st, words_per_stage=w, warps=wp, dense_tiles=1))
            for n, st, w, wp in CHECKED_SINGLE_DENSE]
    out += [("bitmap", LaunchConfig(nrows=n, strips=s, decode=d, value_cap=c, prefetch=4))
            for n, s, d, c in CHECKED_PREFETCH_BITMAP]
    out += [("tiled_csl", LaunchConfig(nrows=n, words_per_stage=2048, warps=w, dense_tiles=t, prefetch=4))
            for n, w, t in CHECKED_PREFETCH_CSL]
    out += [("bitmap", LaunchConfig(nrows=n, strips=s, decode=d, fixup=True)) for n, s, d in CHECKED_FIXUP_BITMAP]
    out += [("tiled_csl", LaunchConfig(nrows=n, words_per_stage=2048, warps=w, dense_tiles=t, fixup=True))
            for n, w, t in CHECKED_FIXUP_CSL]
    out += [("bitmap", LaunchConfig(nrows=n, decode=d, value_cap=c, prefetch=p, persistent=True, fixup=f))
            for n, d, c, p, f in CHECKED_PERSISTENT]
    out += [("bitmap", LaunchConfig(nrows=n, strips=st, stages=sg, decode=d, value_cap=c, persistent=pe,
                                    offset_ring=True)) for n, st, sg, d, c, pe in CHECKED_RING]
    out += [("bitmap", LaunchConfig(nrows=n, strips=st, stages=sg, decode=d, value_cap=c, persistent=pe,
                                    offset_ring=r, prefetch=p, bulk_copy=True)) for n, st, sg, d, c, pe, r, p in CHECKED_BULK]
    out += [("bitmap", LaunchConfig(nrows=n, strips=st, stages=sg, decode=d, value_cap=c, fixup=f, tiles_per_stage=2))
            for n, st, sg, d, c, f in CHECKED_TPS]
    out += [("tiled_csl", LaunchConfig(nrows=8, stages=sg, words_per_stage=w, fixup=f, prefetch=p, cores=c))
            for c, sg, w, f, p in CHECKED_CORES]
    out += [("tiled_csl", LaunchConfig(nrows=n, stages=sg, words_per_stage=w, fixup=f, wgmma=True))
            for n, sg, w, f in CHECKED_WGMMA]
    out += [("bitmap", LaunchConfig(nrows=n, stages=sg, value_cap=c, fixup=f, wgmma=True))
            for n, sg, c, f in CHECKED_WGMMA_BITMAP]
    out += [("bitmap", with_options(LaunchConfig(nrows=n, strips=s, decode=d, value_cap=c, pdl=True),
                                    parse_options("bitmap", [o] if o else []), "bitmap"))
            for n, s, d, c, o in CHECKED_PDL_BITMAP]
    out += [("tiled_csl16", LaunchConfig(nrows=n, stages=sg, words_per_stage=w, warps=wp, x_rows=x, bulk_copy=b))
            for n, sg, w, wp, x, b in CHECKED_CSL16]
    out += [("tiled_csl", with_options(LaunchConfig(nrows=n, words_per_stage=2048, warps=w, dense_tiles=t, pdl=True),
                                       parse_options("tiled_csl", [o] if o else []), "tiled_csl"))
            for n, w, t, o in CHECKED_PDL_CSL]
    return out


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["pending"]:
        # `python -m flashllm.kernels.configs pending`: "<option> <formats,...>" per pending option.
        for name, formats in pending_options().items():
            print(name, ",".join(formats))
        raise SystemExit(0)
    # `python -m flashllm.kernels.configs`: one line per checked variant, "<source> <-D flags>".
    for fmt, cfg in checked_variants():
        print(kernel_source(fmt), " ".join(f"-D{k}={v}" for k, v in sorted(cfg.defines(fmt).items())))
