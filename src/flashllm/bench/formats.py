"""Format benchmark: encode (`from_dense`), decode (`to_dense`) and load-time validation times.

    flashllm bench formats                       # 4096x4096 and 8192x28672 at 50% and 80%, fp16
    flashllm bench formats --shapes 576x1536 --dtype float32 --device cpu

Decoding is what the reference path does on every call, so its time bounds how fast a model runs
where no fast kernel exists. Medians of wall-clock runs (synchronized on the GPU), fresh random data.
On a GPU, fp16/bf16 weights are also expanded by the CUDA kernels that products above
`FLASHLLM_KERNEL_MAX_N` rows can use (`configs.expand_enabled`), with their bandwidth (compressed
bytes read plus dense bytes written, per second) as a fraction of a copy's of the dense weight.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ..formats import FORMATS, get_format
from ..kernels.configs import PENDING_FORMATS


def _median_seconds(fn, device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _kernel_seconds(fn, device: torch.device, reps: int) -> float:
    """Median of CUDA-event timings with L2 flushed between runs (a launch takes tens of
    microseconds, about what a synchronized wall-clock timing adds): the kernel benchmark's timer
    and its default (read) flush; wall clock off the GPU."""
    if device.type != "cuda":
        return _median_seconds(fn, device, reps)
    from .kernels import _timer

    return _timer(device, warmup_ms=10, rep_ms=50)(fn) / 1e3


def _expander(device: torch.device, dtype: torch.dtype):
    """format name -> its `expand` (cuda_module(name).expand) where the kernels can run here, else None."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    from ..kernels import cuda_module, launch

    ok, why = launch.availability()
    if not ok:
        print(f"(no expansion kernels: {why})")
        return None
    return lambda name: cuda_module(name).expand


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="4096x4096,8192x28672", help="comma-separated MxK")
    parser.add_argument("--sparsities", default="0.5,0.8")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--formats", default=",".join(f for f in FORMATS if f not in PENDING_FORMATS),
                        help="comma-separated formats (default: those whose kernels have run on a GPU; "
                             "tiled_csl16 by name)")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    print(f"device {device}, dtype {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    formats = {name: get_format(name) for name in (f.strip() for f in args.formats.split(",")) if name}
    expand = _expander(device, dtype)
    wrong = []
    print("| shape | sparsity | format | bytes / dense | encode s | decode s | validate s | expand kernel s | expand GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        m, k = (int(v) for v in shape.lower().split("x"))
        for sparsity in (float(v) for v in args.sparsities.split(",")):
            weight = torch.randn(m, k, device=device).to(dtype)
            weight.masked_fill_(torch.rand(m, k, device=device) < sparsity, 0)
            # the dense weight read and written, what the expansion's bandwidth is compared with
            copy = None if expand is None else _kernel_seconds(weight.clone, device, args.reps)
            for name, cls in formats.items():
                packed = cls.from_dense(weight)
                state = packed.state_dict()
                encode = _median_seconds(lambda cls=cls, w=weight: cls.from_dense(w), device, args.reps)
                decode = _median_seconds(packed.to_dense, device, args.reps)
                validate = _median_seconds(lambda cls=cls, st=state: cls.from_state_dict(st), device, args.reps)
                kernel = " | "
                if expand is not None:
                    run = expand(name)
                    if not torch.equal(run(packed), packed.to_dense()):  # reported, and the other rows still run
                        wrong.append(f"the {name} expansion kernel disagrees with to_dense at {m}x{k}, {sparsity:.0%}")
                        print(f"| {m}x{k} | {sparsity:.0%} | {name} | WRONG: {wrong[-1]} |", flush=True)
                        continue
                    seconds = _kernel_seconds(lambda p=packed: run(p), device, args.reps)
                    rate = (packed.nbytes + packed.dense_nbytes) / seconds
                    kernel = f"{seconds:.5f} | {rate / 1e9:.0f} ({rate / (2 * packed.dense_nbytes / copy):.0%} of copy)"
                print(f"| {m}x{k} | {sparsity:.0%} | {name} | {packed.nbytes / packed.dense_nbytes:.3f} | "
                      f"{encode:.3f} | {decode:.4f} | {validate:.3f} | {kernel} |", flush=True)
                del packed, state
            del weight
    for problem in wrong:
        print(problem, file=sys.stderr)
    return 1 if wrong else 0
