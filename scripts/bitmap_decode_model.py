"""Cost model of the bitmap kernel's two decodes (configs.DECODES), per warp and 64 x 64 stage.

No GPU needed. Issue: SASS instruction counts of `bitmap_spmm.cu` (sm_90a, fp16, NROWS = 16, one
strip; `cuobjdump -sass` of a `scripts/compile_check.sh` build), counted from the scan to the end of
the four k16 steps: the fragment decode is straight-line code, the scatter decode has a 16-
instruction loop that runs as often as the warp's fullest mask word needs (two bits per trip).
Shared memory: wavefronts (one per distinct 4-byte word in the busiest bank, per instruction),
Monte Carlo over random masks at each density. Per SM, 4 schedulers issue 4 instructions per cycle
and shared memory serves 1 wavefront per cycle, so a warp-stage costs at least
max(instructions / 4, wavefronts) SM cycles.

    python scripts/bitmap_decode_model.py

Measured against this model (H200, Nsight Compute, fragment decode, Llama-2-7B up_proj, N = 16):
490 warp-instructions per warp-stage in all, i.e. about 200 outside the decode section (copy issue,
split-K prologue and epilogue over 4-tile splits), which both decodes share.

The counts below are those of the first kernels. Measured later the same day, the scatter decode
came out slower than this model says (0.54-0.98x below 90%, 1.03-1.19x at 90%: its shared memory
was 83% busy), and the kernels were reworked (lean copy issue, a 9-instruction fragment decode),
so this model is kept as the record of that prediction, not as a description of today's kernels.
"""

from __future__ import annotations

import random

FRAGMENT_SECTION = 293  # instructions per warp-stage, independent of the masks
SCATTER_FIXED = 98  # scan, ldmatrix/mma steps, zeroing: everything but the loop
SCATTER_TRIP = 16  # one trip of scatter_half: two bits
OTHER = 200  # per warp-stage outside the decode section (from the measured 490)
COMMON_WAVEFRONTS = 10  # scan loads, activation ldmatrix


def wavefronts(addresses: list[int]) -> int:
    banks: dict[int, set[int]] = {}
    for a in addresses:
        banks.setdefault((a // 4) % 32, set()).add(a // 4)
    return max((len(words) for words in banks.values()), default=0)


def warp_stage(density: float, rng: random.Random) -> tuple[int, int, int]:
    """(scatter trips, scatter wavefronts, fragment wavefronts) for one random 16 x 64 warp row."""
    words = [[rng.random() < density for _ in range(32)] for _ in range(32)]
    counts = [sum(w) for w in words]
    starts = [sum(counts[:lane]) for lane in range(32)]
    bits = [[p for p in range(31, -1, -1) if words[lane][p]] for lane in range(32)]
    trips = max((c + 1) // 2 for c in counts)
    scatter = 4 * 4 + 16  # ldmatrix.x4 of the B fragments, zeroing 2 KB with 16-byte stores
    for t in range(trips):
        for j in (0, 1):  # the trip's two loads and two stores
            loads = [2 * (starts[lane] + counts[lane] - 1 - 2 * t - j) for lane in range(32) if len(bits[lane]) > 2 * t]
            stores = [64 * lane + 2 * bits[lane][2 * t + j] for lane in range(32) if len(bits[lane]) > 2 * t + j]
            scatter += wavefronts(loads) + wavefronts(stores)
    fragment = 0
    for block in range(16):  # table entry (two addresses: one wavefront) and the two value loads
        pairs = []
        for lane in range(32):
            word = 2 * block + lane // 16
            pairs.append(2 * (starts[word] + sum(words[word][: (2 * lane) % 32])))
        fragment += 1 + wavefronts(pairs) + wavefronts([a + 2 for a in pairs])
    return trips, scatter, fragment


def main() -> None:
    rng = random.Random(0)
    print("sparsity | decode   | instr/warp-stage | smem wavefronts | SM cycles (max) | vs fragment")
    for sparsity in (0.5, 0.6, 0.7, 0.8, 0.9):
        runs = [warp_stage(1 - sparsity, rng) for _ in range(400)]
        trips = sum(r[0] for r in runs) / len(runs)
        wf_scatter = sum(r[1] for r in runs) / len(runs) + COMMON_WAVEFRONTS
        wf_fragment = sum(r[2] for r in runs) / len(runs) + COMMON_WAVEFRONTS
        ins_fragment = FRAGMENT_SECTION + OTHER
        ins_scatter = SCATTER_FIXED + SCATTER_TRIP * trips + OTHER
        cyc_fragment = max(ins_fragment / 4, wf_fragment)
        cyc_scatter = max(ins_scatter / 4, wf_scatter)
        print(f"{sparsity:8.0%} | fragment | {ins_fragment:16.0f} | {wf_fragment:15.0f} | {cyc_fragment:15.0f} |")
        print(f"{sparsity:8.0%} | scatter  | {ins_scatter:16.0f} | {wf_scatter:15.0f} | {cyc_scatter:15.0f} | "
              f"{cyc_fragment / cyc_scatter:.2f}x")


if __name__ == "__main__":
    main()
