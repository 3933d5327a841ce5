"""Build every checked kernel variant as the launcher does and fail on a stack frame or a spill.

    FLASHLLM_NVRTC=<libnvrtc.so.13> python scripts/nvrtc_check.py

NVRTC, which is what runs on users' GPUs, can allocate registers differently from nvcc (on the
H200, three Tiled-CSL variants kept a value on the stack with NVRTC and not with nvcc), so every
checked variant (shipped, and the options tuning may pick), the split-K epilogue and the
expansion kernels are built the way the launcher builds them, for sm_80 and sm_90, both dtypes,
and ptxas's report (--ptxas-options=-v) is checked for stack frames and spills. Exits 0 without
checking where no NVRTC is found (FLASHLLM_NVRTC names one; the nvidia-cuda-nvrtc wheel has it).
scripts/compile_check.sh runs it after its nvcc builds; no GPU needed.
"""

from __future__ import annotations

import re
import sys


def ptxas_numbers(log: str) -> tuple[list[int], list[int], list[int]]:
    """Registers, stack frame bytes and spill store bytes of every kernel in ptxas's -v report."""
    def every(pattern: str) -> list[int]:
        return [int(v) for v in re.findall(pattern, log)]
    return every(r"Used (\d+) registers"), every(r"(\d+) bytes stack frame"), every(r"(\d+) bytes spill stores")


def main() -> int:
    import torch

    from flashllm.kernels import launch

    try:
        compiler = launch.nvrtc()
    except launch.KernelUnavailable as exc:
        print(f"NVRTC check skipped: {exc}")
        return 0
    jobs = launch.build_jobs(checked=True)
    headers = {launch.HEADER: launch.kernel_source(launch.HEADER)}
    bad = total = 0
    for arch in ("sm_80", "sm_90"):
        for source, _name, defines in jobs:
            if not launch.builds_for(arch, defines):
                continue
            for dtype in (torch.float16, torch.bfloat16):
                log: list = []
                options = launch.compile_options(arch, defines, dtype) + ["--ptxas-options=-v"]
                compiler.compile(launch.kernel_source(source), source, options, headers, True, log_sink=log)
                report = "".join(log)
                _, stack, spills = ptxas_numbers(report)
                total += 1
                # ptxas serializes wgmma (with a "Potential Performance Loss" warning) where it
                # cannot prove the accumulators untouched between a wgmma and its wait.
                if not stack or any(stack) or any(spills) or "Performance Loss" in report:
                    bad += 1
                    print(f"FAIL (NVRTC {compiler.version} {arch}) {source} {defines} {dtype}: "
                          f"stack {stack}, spills {spills}; {report.strip()[-300:]}")
    print(f"NVRTC {compiler.version}: {total - bad} / {total} builds with no stack frame and no spills")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
