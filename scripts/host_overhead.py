"""Host (Python) time per eager call of a sparse layer, against dense `F.linear`.

Every layer of an eager forward (a prefill, Hugging Face `generate` without CUDA graphs) pays the
Python between the module call and the kernel launch; on a layer small enough that the GPU is never
the bottleneck, the wall time per call is that host time. Rows:

* ``F.linear``: the dense layer (cuBLAS; the floor of what torch itself costs per call);
* ``SparseLinear``: the sparse module as models call it (launch plan kept on the weight);
* ``spmm``: the functional call on the weight object;
* ``kernel.run``: the launch planned again on every call (config lookup, fitted buffers, split,
  argument conversion), which every call paid before plans were kept.

On a machine without a GPU it runs on the fake GPU of the tests (tests/fake_gpu.py, its product
computation switched off), so the sparse rows are the same Python with the driver call left out,
and ``F.linear`` is a CPU matmul. Wall clock, median of `--repeats` runs of `--calls` calls each,
synchronized once per run.

    python scripts/host_overhead.py [--shape 512x512] [--n 1,16,128,512] [--sparsity 0.8]

N above FLASHLLM_KERNEL_MAX_N (112) is a prefill-sized product: `SparseLinear` and `spmm` expand the
weight (the kept expansion plan) and multiply densely, while `kernel.run` still runs the fused kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def fake_gpu_for_host_timing():
    """Install the tests' fake GPU, its launches doing nothing: only the host side is timed."""
    try:
        import pytest
    except ImportError:
        sys.exit("without a GPU this script runs on the tests' fake GPU, which needs pytest: "
                 "pip install -e '.[test]'")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import fake_gpu

    patch = pytest.MonkeyPatch()
    gpu = fake_gpu.install(patch)
    patch.setattr(fake_gpu.FakeGPU, "launch", lambda self, *args: None)
    patch.setenv("FLASHLLM_SELF_CHECK", "0")  # the checks compare products the fake no longer computes
    return gpu


def per_call_us(fn, calls: int, repeats: int, sync) -> float:
    for _ in range(10):
        fn()
    sync()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="512x512", help="out x in features of the layer")
    parser.add_argument("--n", default="1,16,128,512", help="activation rows per call")
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--formats", default="bitmap,tiled_csl")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    from flashllm.kernels import cuda_module
    from flashllm.kernels.spmm import spmm
    from flashllm.nn import SparseLinear

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        device, sync, where = torch.device("cuda"), torch.cuda.synchronize, torch.cuda.get_device_name()
    else:
        fake_gpu_for_host_timing()
        device, sync, where = torch.device("cpu"), (lambda: None), "no GPU: fake driver, F.linear on the CPU"
    out_features, in_features = (int(v) for v in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(out_features, in_features, generator=gen)
    dense[torch.rand(out_features, in_features, generator=gen) < args.sparsity] = 0
    layer = torch.nn.Linear(in_features, out_features, bias=False).to(device, torch.float16)
    with torch.no_grad():
        layer.weight.copy_(dense)

    print(f"host time per eager call, µs ({where}; {out_features}x{in_features}, {args.sparsity:.0%} sparse, "
          f"fp16, median of {args.repeats} x {args.calls} calls)")
    print(f"{'format':10s} {'N':>4s} {'F.linear':>9s} {'SparseLinear':>13s} {'spmm':>7s} {'kernel.run':>11s}")
    with torch.inference_mode():
        for fmt in args.formats.split(","):
            sparse = SparseLinear.from_linear(layer, fmt)
            weight = sparse.weight_format
            tensors = list(weight.tensors().values())
            kernel = cuda_module(fmt).KERNEL
            for n in (int(v) for v in args.n.split(",")):
                x = torch.randn(n, in_features, generator=gen).to(device, torch.float16)
                times = [per_call_us(fn, args.calls, args.repeats, sync) for fn in (
                    lambda: F.linear(x, layer.weight),
                    lambda: sparse(x),
                    lambda: spmm(x, weight),
                    lambda: kernel.run(x, tensors, out_features, in_features),
                )]
                print(f"{fmt:10s} {n:4d} " + " ".join(f"{t:{w}.1f}" for t, w in zip(times, (9, 13, 7, 11))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
