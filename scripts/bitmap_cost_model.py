"""Static cost model of the bitmap kernel (cuda/bitmap_spmm.cu): issue slots and shared-memory
wavefronts per warp and 64-column stage, read from the compiled SASS, against the ceilings of an
H200. No GPU needed; it needs nvcc and cuobjdump (CUDA toolkit) or a saved `cuobjdump -sass` listing.

    python scripts/bitmap_cost_model.py                      # fragment and scatter, NROWS 8/16/32
    python scripts/bitmap_cost_model.py --nrows 16 --decode fragment --sass listing.sass
    python scripts/bitmap_cost_model.py --nrows 16 --strips 2        # two 64-row strips per block

What it does. The kernel is compiled for sm_90a (the defines of `configs.LaunchConfig`), and its
main loop (the backward branch around the mma instructions) is cut into sections: copy issue (up
to the loop's cp.async commit), the per-warp scan, the decode with its mma steps, and the loop
tail. Every instruction of the loop is counted once per warp and stage, except:
  * the chunks of a tile's compressed run (one run per strip) that a warp does not copy: chunk i of thread t exists if
    t + 128 i < chunks; a warp runs a chunk if any of its lanes has one, and leaves at the first it
    has none (the unrolled `copy_run`), so its count follows the run length, i.e. the sparsity;
  * the scatter decode's inner loop, which runs as often as the warp's fullest mask word needs
    (two bits per trip).
Predicated-off instructions count (they take an issue slot). Shared-memory wavefronts per warp and
stage: a value load of the fragment decode by Monte Carlo over random masks (distinct 4-byte words
in the busiest bank); a table load or scan load 1; a 32-lane 64-bit store 2; a shuffle or
reduction 1 (the same crossbar); ldmatrix.x4 4, .x2 2; a 16-byte cp.async by a full warp 4
(512 bytes written; the mask copy runs in one warp of four); the scatter's random 16-bit stores by
Monte Carlo; a 16-byte zeroing store 4. The `@!PT LDS RZ, [RZ]` that ptxas puts before a cp.async
following a branch never executes: issue slots, no wavefronts.

Ceilings per SM and cycle (H200: 132 SMs at 1.98 GHz): 4 issued warp-instructions, 1 shared-memory
wavefront, and 4.27 TB/s of DRAM = 16.3 bytes. cuBLAS at 3.7 TB/s streams 7.1 fp16 weights per SM
and cycle, so a kernel that sustains E elements per SM and cycle runs at E / 7.1 of cuBLAS. The
elements per cycle printed are the loop's upper bound (the busiest unit busy every cycle, nothing
else costing time); the measured kernels reach about 60% of it (an eligible warp in 63% of cycles,
waves, barriers, the prologue). "+ outside" is every instruction outside the loop (prologue,
epilogue, all of their branches) over `--tiles` stages: an upper bound on that share.

Check against Nsight Compute (H200, 2026-11-26, Llama-2-7B up_proj, N = 16, 50%, split 8, so 8
tiles per block): 15.6 M warp-instructions = 354 per warp and stage, of which this model puts 323
in the loop; L1/shared 72% busy, issue slots 63%.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src", "flashllm", "kernels", "cuda")
THREADS = 128
WARPS = 4
STAGE_ELEMENTS_PER_WARP = 16 * 64
ISSUE_PER_CYCLE = 4
WAVEFRONTS_PER_CYCLE = 1
DRAM_BYTES_PER_CYCLE = 4.27e12 / 132 / 1.98e9
CUBLAS_ELEMENTS_PER_CYCLE = 3.7e12 / 2 / 132 / 1.98e9

LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


@dataclass
class Ins:
    addr: int
    pred: str
    op: str
    args: str

    @property
    def branch_target(self) -> int | None:
        m = re.match(r"0x([0-9a-f]+)", self.args.strip())
        return int(m.group(1), 16) if self.op.startswith("BRA") and m else None


def parse(sass: str, kernel: str = "flashllm_bitmap_spmm") -> list[Ins]:
    start = sass.find(f"Function : {kernel}")
    if start < 0:
        raise SystemExit(f"no function {kernel} in the listing")
    out = []
    for m in LINE.finditer(sass[start:]):
        out.append(Ins(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4)))
        if m.group(3) == "BRA" and out[-1].branch_target == out[-1].addr:  # the end-of-kernel spin
            break
    return out


def nvcc_cubin(source: str, defines: dict, cubin: str, nvcc: str) -> str:
    """Compile kernels/cuda/`source` for sm_90a in fp16 with `defines` into `cubin`; returns
    ptxas's -v report (registers, spills)."""
    cmd = [nvcc, "-cubin", "-gencode=arch=compute_90a,code=sm_90a", "-std=c++17", f"-I{SRC}",
           "-DFLASHLLM_DTYPE=1", *[f"-D{k}={v}" for k, v in defines.items()], "-Xptxas", "-v",
           os.path.join(SRC, source), "-o", cubin]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def compile_sass(nrows: int, decode: str, strips: int, nvcc: str) -> str:
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from flashllm.kernels.configs import LaunchConfig

    defines = LaunchConfig(nrows=nrows, decode=decode, strips=strips).defines("bitmap")
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(shutil.which(nvcc) or ""), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        nvcc_cubin("bitmap_spmm.cu", defines, cubin, nvcc)
        return subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout


@dataclass
class RunCopy:
    """One strip's unrolled run copy (`copy_run`) in the loop body."""

    exits: list[int]  # body indices of its exit branches (one before most chunks)
    chunks: list[int]  # body indices of its chunk copies, in order
    end: int  # body index the exits jump to


@dataclass
class Loop:
    body: list[Ins]
    outside: int  # instructions outside the main loop: prologue and epilogue
    copies: list[RunCopy]  # one per strip
    inner: list[tuple[int, int]]  # the scatter loops' body index ranges (one per strip), if any
    sections: dict[str, tuple[int, int]]


def find_loop(code: list[Ins], strips: int = 1) -> Loop:
    index = {ins.addr: i for i, ins in enumerate(code)}
    best = None
    for i, ins in enumerate(code):
        t = ins.branch_target
        if t is not None and t < ins.addr and any(c.op.startswith("HMMA") for c in code[index[t]:i]):
            if best is None or i - index[t] > best[1] - best[0]:
                best = (index[t], i)
    if best is None:
        raise SystemExit("no main loop (a backward branch around HMMA) in the listing")
    lo, hi = best
    body = code[lo:hi + 1]
    addr = {ins.addr: i for i, ins in enumerate(body)}
    # A run copy's exits: forward branches of the copy section that share one target; each strip
    # has one run copy, and theirs are the targets with the most exits.
    commit = next(i for i, ins in enumerate(body) if ins.op == "LDGDEPBAR")
    targets: dict[int, list[int]] = {}
    for i, ins in enumerate(body[:commit]):
        t = ins.branch_target
        if t is not None and t > ins.addr and any(c.op.startswith("LDGSTS") for c in body[i:addr.get(t, i)]):
            targets.setdefault(t, []).append(i)
    runs = sorted(sorted(targets.items(), key=lambda kv: -len(kv[1]))[:strips])
    copies = [RunCopy(exits, [i for i in range(exits[0], addr[t]) if body[i].op.startswith("LDGSTS")], addr[t])
              for t, exits in runs]
    inner = []
    for i, ins in enumerate(body):
        t2 = ins.branch_target
        if t2 is not None and t2 < ins.addr and i < len(body) - 1 and t2 in addr:
            inner.append((addr[t2], i))
    first_ldsm = next(i for i, ins in enumerate(body) if ins.op.startswith("LDSM") and i > commit)
    scan_end = inner[0][0] if inner and inner[0][0] < first_ldsm else first_ldsm
    last_mma = max(i for i, ins in enumerate(body) if ins.op.startswith(("HMMA", "STS.128")))
    sections = {"copy issue": (0, commit + 1), "scan": (commit + 1, scan_end),
                "decode + mma": (scan_end, last_mma + 1), "loop tail": (last_mma + 1, len(body))}
    return Loop(body, len(code) - len(body), copies, inner, sections)


def wavefronts(addresses: list[int]) -> int:
    banks: dict[int, set[int]] = {}
    for a in addresses:
        banks.setdefault((a // 4) % 32, set()).add(a // 4)
    return max((len(words) for words in banks.values()), default=0)


def random_row(density: float, rng: random.Random) -> tuple[list[list[bool]], list[int]]:
    """A warp's 16 x 64 mask as its 32 words (word j: block j // 2, rows 4 (j % 2)..) and starts."""
    words = [[rng.random() < density for _ in range(32)] for _ in range(32)]
    counts = [sum(w) for w in words]
    return words, [sum(counts[:j]) for j in range(32)]


def fragment_value_wavefronts(density: float, rng: random.Random) -> float:
    words, starts = random_row(density, rng)
    total = 0
    for block in range(16):
        pairs = []
        for lane in range(32):
            j = 2 * block + lane // 16
            pairs.append(2 * (starts[j] + sum(words[j][: (2 * lane) % 32])))
        total += wavefronts(pairs) + wavefronts([a + 2 for a in pairs])
    return total


def scatter_trips_and_wavefronts(density: float, rng: random.Random) -> tuple[int, int]:
    words, starts = random_row(density, rng)
    counts = [sum(w) for w in words]
    bits = [[p for p in range(31, -1, -1) if words[j][p]] for j in range(32)]
    trips = max((c + 1) // 2 for c in counts)
    total = 0
    for t in range(trips):
        for k in (0, 1):  # the trip's two loads and two stores
            live = [j for j in range(32) if len(bits[j]) > 2 * t + k]
            total += wavefronts([2 * (starts[j] + counts[j] - 1 - 2 * t - k) for j in live])
            total += wavefronts([64 * j + 2 * bits[j][2 * t + k] for j in live])
    return trips, total


def chunks_run(chunks: int, warp: int, max_per_thread: int) -> int:
    """Run-copy chunks warp `warp` issues: chunk i if some lane t has t + 128 i < chunks."""
    return sum(1 for i in range(max_per_thread) if 32 * warp + THREADS * i < chunks)


def copy_skipped(copy: RunCopy, c: int) -> int:
    """Instructions of a run copy that a warp with c chunks does not execute: it leaves at the
    exit that tests chunk c, the first exit after chunk c - 1 that comes before chunk c (a chunk
    with no exit before it is predicated, and runs as a predicated-off copy)."""
    after = copy.chunks[c - 1] if c > 0 else -1
    before = copy.chunks[c] if c < len(copy.chunks) else copy.end
    exit_ = next((e for e in copy.exits if after < e < before), None)
    return 0 if exit_ is None else copy.end - exit_ - 1


def model(loop: Loop, sparsity: float, nrows: int, tiles: int, samples: int = 200) -> dict:
    rng = random.Random(0)
    density = 1 - sparsity
    body = loop.body
    strips = len(loop.copies)
    elements = STAGE_ELEMENTS_PER_WARP * strips
    chunks = -(-int(round(64 * 64 * density)) * 2 // 16)
    skipped = sum(copy_skipped(copy, chunks_run(chunks, w, len(copy.chunks)))
                  for copy in loop.copies for w in range(WARPS)) / WARPS
    trips = wf_inner = 0.0
    fragment_wf = 0.0
    if loop.inner:
        runs = [scatter_trips_and_wavefronts(density, rng) for _ in range(samples)]
        trips = sum(r[0] for r in runs) / samples
        wf_inner = strips * sum(r[1] for r in runs) / samples  # one loop per strip
    else:
        fragment_wf = strips * sum(fragment_value_wavefronts(density, rng) for _ in range(samples)) / samples
    inner_len = sum(b - a + 1 for a, b in loop.inner)
    issue = len(body) - skipped + (trips - 1) * inner_len  # body holds each scatter loop once; it runs `trips` times
    # Shared-memory wavefronts of the instructions that execute once per warp and stage.
    wf = fragment_wf + wf_inner
    for i, ins in enumerate(body):
        if ins.pred == "@!PT" or any(a <= i <= b for a, b in loop.inner):
            continue
        op = ins.op
        if op.startswith("LDGSTS"):
            continue  # counted below from the bytes each warp copies
        if op.startswith("LDSM"):
            wf += 4 if ".4" in op else 2 if ".2" in op else 1
        elif op.startswith("LDS.U16") and not loop.inner:
            continue  # the decode's value loads: Monte Carlo above
        elif op.startswith("LDS"):
            wf += 1
        elif op.startswith("STS"):
            wf += 4 if ".128" in op else 2 if ".64" in op else 1
        elif op.startswith(("SHFL", "REDUX")):
            wf += 1
    x_bytes = nrows * 128 / WARPS  # the stage's activations, spread over the 4 warps
    run_bytes = strips * 16 * chunks / WARPS
    wf += (x_bytes + run_bytes + strips * 512 / WARPS) / 128
    weight_bytes = elements * (0.125 + 2 * density)
    cycles = {"issue": issue / ISSUE_PER_CYCLE, "shared memory": wf / WAVEFRONTS_PER_CYCLE,
              "DRAM": weight_bytes / DRAM_BYTES_PER_CYCLE}
    bound = max(cycles, key=cycles.get)
    per_cycle = elements / cycles[bound]
    return {"issue": issue, "outside": loop.outside / max(tiles, 1), "wavefronts": wf, "trips": trips,
            "bound": bound, "elements": per_cycle, "speedup_cap": per_cycle / CUBLAS_ELEMENTS_PER_CYCLE,
            "per_weight": issue / elements}


def sections_report(loop: Loop) -> str:
    parts = []
    for name, (a, b) in loop.sections.items():
        parts.append(f"{name} {b - a}")
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nrows", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--decode", nargs="*", default=["fragment", "scatter"])
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.9])
    ap.add_argument("--strips", type=int, default=1, help="64-row strips per block (1 or 2)")
    ap.add_argument("--tiles", type=int, default=8, help="tiles per split-K block (prologue share)")
    ap.add_argument("--sass", help="a cuobjdump -sass listing to read instead of compiling (one nrows/decode)")
    ap.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    args = ap.parse_args()
    if args.sass is None and shutil.which(args.nvcc) is None:
        raise SystemExit(f"{args.nvcc} not found: install the CUDA toolkit or pass --sass")
    print("decode   | NROWS | sparsity | loop instr/warp-stage (per weight) | + outside | smem wavefronts "
          "| bound         | elements/SM/cycle | cap x cuBLAS")
    for decode in args.decode:
        for nrows in args.nrows:
            if args.sass:
                with open(args.sass, encoding="utf-8") as fh:
                    sass = fh.read()
            else:
                sass = compile_sass(nrows, decode, args.strips, args.nvcc)
            loop = find_loop(parse(sass), args.strips)
            print(f"# {decode}, NROWS {nrows}, {len(loop.copies)} strip(s): loop {len(loop.body)} instructions "
                  f"({sections_report(loop)}), {loop.outside} outside it; run copy: {len(loop.copies[0].chunks)} "
                  f"chunks, {len(loop.copies[0].exits)} exits"
                  + "".join(f"; inner loop {b - a + 1}" for a, b in loop.inner))
            for s in args.sparsity:
                r = model(loop, s, nrows, args.tiles)
                print(f"{decode:8} | {nrows:5} | {s:8.0%} | {r['issue']:21.0f} ({r['per_weight']:.3f})       "
                      f"| {r['outside']:9.0f} | {r['wavefronts']:15.0f} | {r['bound']:13} | {r['elements']:17.1f} "
                      f"| {r['speedup_cap']:.2f}")
            if args.sass:
                return


if __name__ == "__main__":
    main()
