"""Registers, spills and resident blocks per SM of every checked kernel variant, against a git revision.

    python scripts/register_check.py --base HEAD~1            # what a kernel edit did to ptxas's choices
    python scripts/register_check.py --base HEAD~1 --only tiled_csl --arch sm_90

A change to a kernel's code can move ptxas's register count by a few either way, and a few more
registers can cost a resident block per SM (the kernels are latency-bound, so that costs time)
without any spill that scripts/compile_check.sh would report. This compiles each variant the GPU
tests run (`configs.checked_variants`, fp16) with NVRTC as the launcher does, here and at `--base`,
and prints the variants that spill or use a stack frame, and those whose resident blocks per SM
change: the lesser of what the registers allow (64K per SM, allocated per warp in steps of 256)
and what the shared memory allows (the layout's bytes plus 1 KB reserved per block, against 228 KB
on sm_90 and 164 KB on sm_80). Exits 1 if any variant spills or loses a block. Needs NVRTC
(FLASHLLM_NVRTC or the nvidia-cuda-nvrtc wheel), no GPU.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nvrtc_check import ptxas_numbers  # noqa: E402
from sass_loops import git_show  # noqa: E402

SHARED_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
RESERVED_PER_BLOCK = 1024
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048


def resident_blocks(registers: int, threads: int, smem_bytes: int, arch: str) -> int:
    """Blocks of `threads` threads that fit on one SM at `registers` per thread and `smem_bytes` of
    dynamic shared memory per block (registers are allocated per warp, 256 at a time)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM // (per_warp * (threads // 32))
    by_shared = SHARED_PER_SM[arch] // (smem_bytes + RESERVED_PER_BLOCK)
    return min(by_registers, by_shared, MAX_THREADS_PER_SM // threads, 32)


def ptxas_report(log: str) -> tuple[int, int, int]:
    """(registers, stack frame bytes, spill store bytes) of the first kernel in ptxas's -v report,
    -1 for what it does not say."""
    return tuple(found[0] if found else -1 for found in ptxas_numbers(log))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", metavar="REF", required=True, help="git revision to compare with")
    parser.add_argument("--arch", choices=sorted(SHARED_PER_SM), action="append",
                        help="sm_80 and/or sm_90 (default: both)")
    parser.add_argument("--only", help="kernel source name part: bitmap, tiled_csl, ... (default: every spmm kernel)")
    args = parser.parse_args(argv)

    import torch

    from flashllm.kernels import configs, launch

    compiler = launch.nvrtc()
    trees = {"now": launch.kernel_source, args.base: lambda name: git_show(args.base, name)}
    deltas: Counter = Counter()
    bad = 0
    jobs = [(fmt, cfg) for fmt, cfg in configs.checked_variants() if not args.only or args.only in fmt]
    for arch in args.arch or sorted(SHARED_PER_SM):
        for fmt, cfg in dict.fromkeys(jobs):
            source, defines = configs.kernel_source(fmt), cfg.defines(fmt)
            if not launch.builds_for(arch, defines):
                continue
            options = launch.compile_options(arch, defines, torch.float16) + ["--ptxas-options=-v"]
            reports = {}
            for tree, read in trees.items():
                log: list = []
                try:
                    compiler.compile(read(source), source, options, {launch.HEADER: read(launch.HEADER)}, True,
                                     log_sink=log)
                except RuntimeError:
                    if tree == "now":
                        raise
                    reports[tree] = None  # a variant the base tree does not have
                    continue
                reports[tree] = ptxas_report("".join(log))
            regs, stack, spill = reports["now"]
            blocks = resident_blocks(regs, cfg.threads, defines["FLASHLLM_SMEM_BYTES"], arch)
            if stack or spill:
                bad += 1
                print(f"SPILL  {arch} {fmt} {cfg}: {regs} registers, stack {stack}, spills {spill}")
            if reports[args.base] is None:
                bad += blocks < 1
                print(f"NEW    {arch} {fmt} {cfg}: {regs} registers, {blocks} blocks per SM")
                continue
            base_regs = reports[args.base][0]
            base_blocks = resident_blocks(base_regs, cfg.threads, defines["FLASHLLM_SMEM_BYTES"], arch)
            deltas[regs - base_regs] += 1
            if blocks != base_blocks:
                bad += blocks < base_blocks
                print(f"{'LOST ' if blocks < base_blocks else 'GAINED'} {arch} {fmt} {cfg}: {base_regs} -> {regs} "
                      f"registers, {base_blocks} -> {blocks} blocks per SM")
    print(f"register changes against {args.base} (change: variants): {dict(sorted(deltas.items()))}")
    print(f"{bad} variants spill or lose a resident block")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
