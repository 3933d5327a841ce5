"""First-use check of each CUDA kernel variant on the GPU that runs it.

The GPU test grid ran on one H200; users run other GPUs (an A100's sm_80 builds have never run) and
kernel variants changed after the last GPU run (docs/kernels.md, "What is not validated"). So the
first time a process is about to use a variant for a real product, it runs that variant once on a
small random weight of the same format (odd sizes, a full-density tile, split-K off and on, twice
on, so what one launch leaves behind meets the next) against a float64 product. A variant that
fails is never used: its products take the reference path, with a warning that names it. The
check costs a few milliseconds per variant and process; ``FLASHLLM_SELF_CHECK=0`` skips it. It
catches what a wrong layout, index or pipeline step does to every product, not a fault that only
one shape or an unlucky schedule shows: the device script's tests and sanitizers are for those.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Optional

import torch

from . import configs, launch

if TYPE_CHECKING:
    from .cuda_op import CudaKernel

ENV = "FLASHLLM_SELF_CHECK"
SEED = 20261127
DENSITY = 0.4  # outside the dense tile; bitmap weights with a capped value buffer get less (below)
SPLITS = (1, 3, 3)  # 4 K tiles: unsplit, then split-K twice in a row


def enabled() -> bool:
    return configs.getenv(ENV) != "0"


def check_weight(kernel: "CudaKernel", cfg: configs.LaunchConfig, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """A random dense weight for checking `cfg`: two block rows of the kernel plus 5 rows, 3 tiles
    of columns plus 9, its first tile fully dense unless `cfg` caps the values a tile may hold. Drawn
    from its own generator: the caller's random state is left alone."""
    rows = max(cfg.rows_per_block(kernel.format), kernel.tile[0])
    shape = (2 * rows + 5, 3 * kernel.tile[1] + 9)
    gen = torch.Generator().manual_seed(SEED)
    weight = torch.randn(shape, generator=gen)
    density = DENSITY
    capped = 0 < cfg.value_cap < 4096
    if capped:  # a run longer than the cap is refused before launch: stay well inside it
        density = min(DENSITY, cfg.value_cap / (2 * kernel.tile[0] * kernel.tile[1]))
    keep = torch.rand(shape, generator=gen) < density
    if not capped:
        keep[: kernel.tile[0], : kernel.tile[1]] = True
    return (weight * keep).to(device, dtype)


RunFn = Callable[..., torch.Tensor]


def check_variant(kernel: "CudaKernel", cfg: configs.LaunchConfig, dtype: torch.dtype, device: torch.device,
                  run: Optional[RunFn] = None) -> Optional[str]:
    """What is wrong with the products of variant `cfg` (its split_k aside) of `kernel` on `device`,
    or None when they are right. `run` (default `kernel.run`) has `CudaKernel.run`'s signature."""
    from ..formats import get_format

    run = run or kernel.run
    weight = check_weight(kernel, cfg, dtype, device)
    out_features, in_features = weight.shape
    packed = get_format(kernel.format).from_dense(weight)
    tensors = list(packed.tensors().values())
    gen = torch.Generator().manual_seed(SEED + 1)
    # One full block of rows along N and a partial one; the CUDA-core path's one row.
    n = 1 if cfg.cores else cfg.nrows + 3
    x = torch.randn(n, in_features, generator=gen).to(device, dtype)
    bias = torch.randn(out_features, generator=gen).to(device, dtype)
    ref = (x.double() @ weight.double().T + bias.double()).float()
    for split in SPLITS:
        out = torch.full((n, out_features), float("nan"), dtype=dtype, device=device)
        y = run(x, tensors, out_features, in_features, bias, replace(cfg, split_k=split), out)
        problem = launch.output_problem(y, ref)
        if problem:
            return f"{problem} (split_k={split})"
    return None


def check_expansion(kernel: "CudaKernel", dtype: torch.dtype, device: torch.device,
                    expand: Optional[Callable] = None) -> Optional[str]:
    """What is wrong with `kernel`'s expansion kernel on `device` (its dense weight must equal
    `to_dense` to the bit), or None. `expand` (default `kernel.expand_weight`) takes the packed weight."""
    from ..formats import get_format

    expand = expand or kernel.expand_weight
    packed = get_format(kernel.format).from_dense(check_weight(kernel, configs.LaunchConfig(nrows=16), dtype, device))
    dense = expand(packed)
    expected = packed.to_dense()
    if dense.shape != expected.shape:
        return f"shape {tuple(dense.shape)} instead of {tuple(expected.shape)}"
    wrong = int((dense != expected).sum())
    return f"{wrong} of {expected.numel()} elements differ from to_dense" if wrong else None
