"""`spmm`: y = x @ W.T (+ bias) for a compressed W, with F.linear semantics.

One torch custom op, ``flashllm::sparse_linear``, carries every format: the format's tensors go in
as a list, the format code picks the decoder. Being a custom op with a fake implementation, it is
opaque to `torch.compile` (no graph breaks on the data-dependent decoding) and safe inside CUDA
graphs once a fast kernel backs it. Fast GPU kernels register themselves in `FAST_KERNELS`; where
none is registered for a format and device, the reference path runs: decode the tile layout to a
dense weight, then one dense GEMM. It is exact and works everywhere, but it reads the weight twice
and writes it once, so it is never faster than dense.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..formats import FORMATS_BY_CODE, SparseWeight

# (format_code, device type) -> kernel(x, tensors, out_features, in_features, bias) -> y, or None
# when the kernel declines this input (the reference path then runs).
FastKernel = Callable[..., Optional[torch.Tensor]]
FAST_KERNELS: dict[tuple[int, str], FastKernel] = {}
_warned: set[tuple[int, str]] = set()


def _decode(tensors: list[torch.Tensor], format_code: int, shape: tuple[int, int], dtype: torch.dtype):
    cls = FORMATS_BY_CODE[format_code]
    return cls(shape, dtype, **dict(zip(cls.tensor_names, tensors))).to_dense()


def reference_linear(
    x: torch.Tensor, tensors: list[torch.Tensor], format_code: int, out_features: int,
    in_features: int, bias: Optional[torch.Tensor],
) -> torch.Tensor:
    return F.linear(x, _decode(tensors, format_code, (out_features, in_features), x.dtype), bias)


def _sparse_linear(
    x: torch.Tensor,
    tensors: list[torch.Tensor],
    format_code: int,
    out_features: int,
    in_features: int,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    kernel = FAST_KERNELS.get((format_code, x.device.type))
    if kernel is not None:
        y = kernel(x, tensors, out_features, in_features, bias)
        if y is not None:
            return y
    elif x.device.type == "cuda" and (format_code, "cuda") not in _warned:
        _warned.add((format_code, "cuda"))
        warnings.warn(
            f"flashllm: no fast CUDA kernel is available for the {FORMATS_BY_CODE[format_code].name} "
            "format (see `flashllm info`); using the reference path, which is slower than dense",
            stacklevel=2,
        )
    return reference_linear(x, tensors, format_code, out_features, in_features, bias)


sparse_linear = torch.library.custom_op("flashllm::sparse_linear", _sparse_linear, mutates_args=())


def _eager_inference(x: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether `spmm` may run the op's implementation without the dispatcher: a plain tensor (no
    fake, meta or other subclass), nothing to differentiate, no dispatch or torch-function mode
    watching (fake tensors, flop counters), not inside torch.compile or a trace. The custom op's
    dispatch (autograd wrapper, redispatch) costs 30-40 µs a call on a CPU, paid by every layer of
    an eager forward: a prefill, or `generate` without CUDA graphs."""
    # (torch.compile first: Dynamo folds it to True and must not trace the mode checks.)
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and type(x) is torch.Tensor and x.device.type != "meta" and not x.requires_grad
            and (bias is None or not bias.requires_grad)
            and _get_current_dispatch_mode() is None and not torch._C._is_torch_function_mode_enabled())


@sparse_linear.register_fake
def _(x, tensors, format_code, out_features, in_features, bias):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, tensors, format_code, out_features, in_features, bias = inputs
    ctx.save_for_backward(*tensors)
    ctx.meta = (format_code, out_features, in_features, x.dtype, bias is not None)


def _backward(ctx, grad):
    # Gradients flow to the activations (and bias) only: the compressed weight is frozen, as in
    # adapter fine-tuning of a sparse base model.
    format_code, out_features, in_features, dtype, has_bias = ctx.meta
    weight = _decode(list(ctx.saved_tensors), format_code, (out_features, in_features), dtype)
    grad_x = grad @ weight
    grad_bias = grad.reshape(-1, out_features).sum(0) if has_bias else None
    return grad_x, [None] * len(ctx.saved_tensors), None, None, None, grad_bias


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


def kernel_path(format_name: str, device_type: str) -> str:
    """Which implementation `spmm` runs for a format on a device type, in words."""
    from ..formats import get_format

    code = get_format(format_name).format_code
    if (code, device_type) in FAST_KERNELS:
        if device_type == "cuda":
            from .configs import MAX_FAST_N, PENDING_FORMATS, expand_enabled

            from . import self_check

            above = "the expansion kernel + cuBLAS above that" if expand_enabled() else "reference otherwise"
            check = "each variant checked on first use" if self_check.enabled() else \
                f"first-use checks off by {self_check.ENV}=0"
            pending = "; experimental: not yet run on a GPU" if format_name in PENDING_FORMATS else ""
            return (f"fast CUDA kernel for fp16/bf16 and up to {MAX_FAST_N} rows on compute capability "
                    f"8.0+ ({check}{pending}); {above}")
        return f"fast {device_type.upper()} kernel"
    if device_type == "cuda":
        return "reference (decode + dense GEMM): the CUDA kernels are off (FLASHLLM_CUDA_KERNELS=0)"
    return "reference (decode + dense GEMM)"


def spmm(x: torch.Tensor, weight: SparseWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight.to_dense(), bias)`` without materializing the dense weight on a fast path.

    ``x`` is ``(..., in_features)`` in the weight's dtype and on its device; the result is
    ``(..., out_features)``.
    """
    if not isinstance(weight, SparseWeight):
        raise TypeError(f"weight must be a flashllm sparse weight, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"x has shape {tuple(x.shape)}, but the weight ({out_features} x {in_features}) needs "
            f"its last dimension to be {in_features}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {weight.dtype}; cast one of them")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}; expected {x.dtype} on {x.device}")
    op = _sparse_linear if _eager_inference(x, bias) else sparse_linear
    return op(x, list(weight.tensors().values()), weight.format_code, out_features, in_features, bias)

