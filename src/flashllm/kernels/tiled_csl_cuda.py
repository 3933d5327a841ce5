"""The Tiled-CSL format's CUDA kernel (``cuda/tiled_csl_spmm.cu``): launcher and fast-path entry.

EXPERIMENTAL: written and compiled without a GPU; until scripts/device_check.sh has passed on one,
it is registered only when ``FLASHLLM_CUDA_KERNELS=1`` (see `flashllm.kernels.register_cuda_kernels`).

`tiled_csl_linear` always runs the kernel and raises for inputs it cannot take; `fast_kernel`, the
`flashllm::sparse_linear` entry, returns None (reference path) for inputs the kernel does not serve.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..formats.tiled_csl import TILE_K, TILE_M, TiledCSLWeight
from . import configs, launch
from .launch import i32, ptr

FORMAT = "tiled_csl"
KERNEL = "flashllm_tiled_csl_spmm"
SOURCE = "tiled_csl_spmm.cu"
DTYPES = (torch.float16, torch.bfloat16)


def _grid_shape(out_features: int, in_features: int) -> tuple[int, int]:
    return -(-out_features // TILE_M), -(-in_features // TILE_K)


def check_inputs(x2d: torch.Tensor, words: torch.Tensor, offsets: torch.Tensor, out_features: int,
                 in_features: int, bias: Optional[torch.Tensor]) -> None:
    """Raise for inputs no kernel could compute correctly (the messages name what is wrong)."""
    if x2d.dim() != 2 or x2d.shape[1] != in_features:
        raise ValueError(f"x must be (N, {in_features}), got {tuple(x2d.shape)}")
    if x2d.dtype not in DTYPES:
        raise TypeError(f"the Tiled-CSL CUDA kernel takes float16 or bfloat16, got {x2d.dtype}")
    mt, kt = _grid_shape(out_features, in_features)
    for name, t, dtype, numel in (("words", words, torch.int32, None), ("offsets", offsets, torch.int32, mt * kt + 1)):
        if t.device != x2d.device:
            raise ValueError(f"tiled_csl {name} is on {t.device}, x on {x2d.device}")
        if t.dtype != dtype or t.dim() != 1 or not t.is_contiguous():
            raise TypeError(f"tiled_csl {name} must be a contiguous 1-D {dtype} tensor, got {t.dtype} {tuple(t.shape)}")
        if numel is not None and t.numel() != numel:
            raise ValueError(
                f"tiled_csl {name} has {t.numel()} entries; a ({out_features} x {in_features}) weight needs {numel}"
            )
    launch.check_aligned("tiled_csl words", words)
    launch.check_aligned("tiled_csl offsets", offsets, 4)
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x2d.dtype or bias.device != x2d.device):
        raise ValueError(f"bias must be ({out_features},) {x2d.dtype} on {x2d.device}, got {tuple(bias.shape)} {bias.dtype}")
    if not x2d.is_cuda:
        raise ValueError(f"the Tiled-CSL CUDA kernel needs CUDA tensors; x is on {x2d.device}")


def sparsity_of(words: torch.Tensor, out_features: int, in_features: int) -> float:
    """Sparsity estimated from the stored length (metadata only: no device sync)."""
    return max(0.0, 1.0 - words.numel() / (out_features * in_features))


def resolve_config(x2d: torch.Tensor, words: torch.Tensor, offsets: torch.Tensor, out_features: int,
                   in_features: int, bias: Optional[torch.Tensor],
                   config: Optional[configs.LaunchConfig]) -> configs.LaunchConfig:
    if config is not None:
        return config.validate(FORMAT)
    arch = configs.arch_key(torch.cuda.get_device_capability(x2d.device))
    n, sparsity = x2d.shape[0], sparsity_of(words, out_features, in_features)
    if (configs.retune_requested() and not torch.cuda.is_current_stream_capturing()
            and configs.lookup(arch, FORMAT, out_features, in_features, n, sparsity) is None):
        kt = _grid_shape(out_features, in_features)[1]
        best, _, _ = launch.tune(
            lambda c: tiled_csl_linear(x2d, words, offsets, out_features, in_features, bias, c),
            configs.tuning_candidates(FORMAT, n, sparsity, kt),
        )
        configs.remember(configs.key_for(arch, FORMAT, out_features, in_features, n, sparsity), best)
        return best
    return configs.get_config(arch, FORMAT, out_features, in_features, n, sparsity)


def tiled_csl_linear(x2d: torch.Tensor, words: torch.Tensor, offsets: torch.Tensor, out_features: int,
                     in_features: int, bias: Optional[torch.Tensor] = None,
                     config: Optional[configs.LaunchConfig] = None,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2d @ W.T (+ bias)`` for a Tiled-CSL weight given by its tensors; x2d is (N, in_features).

    Runs the CUDA kernel unconditionally (raises `launch.KernelUnavailable` where it cannot run).
    `out`, if given, is the (N, out_features) contiguous result buffer (tests poison it first)."""
    check_inputs(x2d, words, offsets, out_features, in_features, bias)
    cfg = resolve_config(x2d, words, offsets, out_features, in_features, bias, config)
    n = x2d.shape[0]
    y = launch.output_buffer(out, n, out_features, x2d)
    if n == 0:
        return y
    xk, ldx, kx = launch.prepare_activations(x2d, in_features)
    bias = None if bias is None else bias.contiguous()
    mt, kt = _grid_shape(out_features, in_features)
    kernel = launch.get_kernel(SOURCE, KERNEL, cfg.defines(FORMAT), x2d.dtype, x2d.device, cfg.smem_bytes(FORMAT))
    blocks_n = -(-n // cfg.nrows)
    split = cfg.split_k
    if split == 0:
        sms = torch.cuda.get_device_properties(x2d.device).multi_processor_count
        bpe = words.numel() * 4 / (out_features * in_features)
        split = configs.auto_split_k(kt, mt * blocks_n, sms * max(kernel.occupancy, 1),
                                     min(n, cfg.nrows), in_features, bpe)
    splits, per_split = launch.split_plan(kt, split)
    ws = torch.zeros((n, out_features), dtype=torch.float32, device=x2d.device) if splits > 1 else None
    with torch.cuda.device(x2d.device):
        stream = launch.current_stream(x2d.device)
        kernel.launch(
            (mt, splits, blocks_n),
            [
                # pointers
                ptr(xk), ptr(words), ptr(offsets), ptr(bias), ptr(y), ptr(ws),
                # sizes
                i32(out_features), i32(n), i32(ldx), i32(kx), i32(kt), i32(mt), i32(per_split),
            ],
            stream,
        )
        if ws is not None:
            launch.run_splitk_finalize(ws, bias, y, stream)
    return y


def linear(x2d: torch.Tensor, weight: TiledCSLWeight, bias: Optional[torch.Tensor] = None,
           config: Optional[configs.LaunchConfig] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`tiled_csl_linear` on a `TiledCSLWeight`."""
    return tiled_csl_linear(x2d, weight.words, weight.offsets, *weight.shape, bias, config, out)


_declined: set[str] = set()


def _decline(reason: str) -> None:
    if reason not in _declined:
        _declined.add(reason)
        warnings.warn(f"flashllm: Tiled-CSL CUDA kernel not used ({reason}); running the reference path",
                      stacklevel=4)
    return None


def fast_kernel(x: torch.Tensor, tensors: list[torch.Tensor], out_features: int, in_features: int,
                bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The `FAST_KERNELS` entry: the product, or None to let the reference path run."""
    if x.dtype not in DTYPES:
        return None  # float32 weights (int64 words): served by the reference path by design
    if len(tensors) != 2:
        raise ValueError(f"the Tiled-CSL format has 2 tensors (words, offsets), got {len(tensors)}")
    x2d = x.reshape(-1, in_features)
    if x2d.shape[0] > configs.MAX_FAST_N:
        return None  # prefill-sized batches: decode once + dense GEMM is the faster plan
    words, offsets = tensors
    if torch.cuda.get_device_capability(x.device) < launch.MIN_CAPABILITY:
        return _decline(f"compute capability {torch.cuda.get_device_capability(x.device)} < 8.0")
    if words.data_ptr() % 16 or not all(t.is_contiguous() for t in tensors):
        return _decline("weight tensors not contiguous or not 16-byte aligned")
    try:
        y = tiled_csl_linear(x2d, words, offsets, out_features, in_features, bias)
    except launch.KernelUnavailable as exc:
        return _decline(str(exc))
    return y.reshape(*x.shape[:-1], out_features)
