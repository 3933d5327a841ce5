"""`SparseLinear`, the drop-in `nn.Linear` that holds a compressed weight, and the model-wide swap."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats import AUTO, FORMATS_BY_CODE, SparseWeight, check_format_name, format_for
from .formats.base import HEADER_KEY, FormatError
from .kernels import spmm
from .layers import FilterFn, dense_weight, is_linear, linear_layers, set_submodule


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with W kept compressed in one of the sparse formats.

    The format's tensors are buffers, so `.to()`, `state_dict()` and `load_state_dict()` work as for
    any module; the state dict also carries the format header (format, layout version, shape,
    dtype), and loading checks the data before accepting it. The bias stays a dense parameter.
    """

    def __init__(self, weight: SparseWeight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if not isinstance(weight, SparseWeight):
            raise TypeError(f"weight must be a flashllm sparse weight, got {type(weight).__name__}")
        if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},) and dtype {weight.dtype}, got "
                f"{tuple(bias.shape)} {bias.dtype}"
            )
        self._set_weight(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _set_weight(self, weight: SparseWeight) -> None:
        self.__dict__.pop("_weight_object", None)  # it holds the replaced tensors
        self.format_cls = type(weight)
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)

    @classmethod
    def from_linear(cls, linear: nn.Module, format: str = "bitmap") -> "SparseLinear":
        """Pack an `nn.Linear` (or Hugging Face `Conv1D`) whose weight already holds its zeros, in
        `format` ("auto": by its sparsity, `flashllm.formats.format_for`)."""
        if not is_linear(linear):
            raise TypeError(f"expected nn.Linear or Conv1D, got {type(linear).__name__}")
        with torch.no_grad():
            dense = dense_weight(linear).detach()
            weight = format_for(format, dense).from_dense(dense)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, bias)

    @property
    def weight_format(self) -> SparseWeight:
        """The weight object over this module's buffers; the same object while the buffers are
        (every forward asks for it: building it each time was a tenth of an eager call's Python)."""
        buffers = self._buffers
        names = self.format_cls.tensor_names
        weight = self.__dict__.get("_weight_object")
        if weight is None or not all(getattr(weight, name) is buffers[name] for name in names):
            weight = self.format_cls((self.out_features, self.in_features), self.weight_dtype,
                                     **{name: buffers[name] for name in names})
            self.__dict__["_weight_object"] = weight
        return weight

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_dtype

    @property
    def device(self) -> torch.device:
        return getattr(self, self.format_cls.tensor_names[0]).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spmm(x, self.weight_format, self.bias)

    def to_linear(self) -> nn.Linear:
        """The dense `nn.Linear` this module computes (for export or comparison)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.device, dtype=self.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight_format.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        w = self.weight_format
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={w.name}, dtype={str(self.dtype).removeprefix('torch.')}, "
            f"sparsity={w.sparsity:.1%}, nbytes={w.nbytes} ({w.nbytes / w.dense_nbytes:.1%} of dense)"
        )

    # A cast changes how the format stores values (Tiled-CSL packs them inside int words), so the
    # generic per-tensor `_apply` is not enough: probe what `fn` does to a float tensor and convert.
    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.device))
        if probe.device != self.device or probe.dtype != self.weight_dtype:
            self._set_weight(self.weight_format.to(device=probe.device, dtype=probe.dtype))
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + HEADER_KEY] = self.weight_format.state_dict()[HEADER_KEY]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The stored tensors' sizes depend on the sparsity, so they replace the buffers wholesale,
        # after validation, instead of being copied into buffers of a fixed size.
        header = state_dict.get(prefix + HEADER_KEY)
        if header is None:
            missing_keys.append(prefix + HEADER_KEY)
        else:
            cls = format_of_header(header, prefix + HEADER_KEY)
            local = {k: state_dict[prefix + k] for k in (HEADER_KEY, *cls.tensor_names) if prefix + k in state_dict}
            weight = cls.from_state_dict(local)
            if not (local_metadata.get("assign_to_params_buffers") or self.device.type == "meta"):
                weight = weight.to(device=self.device, dtype=self.weight_dtype)
            for name in self.format_cls.tensor_names:
                del self._buffers[name]
            self._set_weight(weight)
        # The bias loads the usual way; the format's keys are ours and must not look unexpected.
        ours = {prefix + k for k in (HEADER_KEY, *self.format_cls.tensor_names)}
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        buffers = {name: self._buffers.pop(name) for name in self.format_cls.tensor_names}
        try:
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            self._buffers.update(buffers)


def format_of_header(header: torch.Tensor, where: str) -> type[SparseWeight]:
    code = int(header[0]) if header.dim() == 1 and header.numel() else None
    if code not in FORMATS_BY_CODE:
        raise FormatError(f"{where} does not name a known sparse format (code {code})")
    return FORMATS_BY_CODE[code]


@dataclass
class SparsifySummary:
    format: str
    layers: int
    dense_bytes: int
    compressed_bytes: int

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / self.dense_bytes if self.dense_bytes else 1.0

    def __str__(self) -> str:
        return (
            f"{self.layers} linear layers -> {self.format}: {self.dense_bytes / 2**20:.1f} MiB dense, "
            f"{self.compressed_bytes / 2**20:.1f} MiB compressed ({self.ratio:.1%})"
        )


def format_label(requested: str, chosen: Iterable[str]) -> str:
    """`requested`, and for "auto" how many layers went to each format: "auto (30 bitmap, 4 tiled_csl)"."""
    if requested != AUTO:
        return requested
    return f"{AUTO} ({', '.join(f'{n} {fmt}' for fmt, n in sorted(Counter(chosen).items()))})"


def sparsify_(
    model: nn.Module,
    format: str = "bitmap",
    filter_fn: Optional[FilterFn] = None,
    progress: bool = True,
) -> SparsifySummary:
    """Replace, in place, every linear layer except the LM head by a `SparseLinear` in `format`
    ("bitmap", "tiled_csl", "tiled_csl16", or "auto": each layer in the format whose GPU kernel is
    faster at its sparsity, `flashllm.formats.format_for`).

    The weights are packed as they are: prune first (`flashllm.prune_`) to put zeros in them.
    `filter_fn(module, qualified_name)` chooses other layers; it must select linear layers only.
    """
    check_format_name(format)
    targets = list(linear_layers(model, filter_fn))
    for name, module in targets:
        if not is_linear(module):
            raise TypeError(f"filter_fn selected {name!r}, a {type(module).__name__}, which is not a linear layer")
    summary = SparsifySummary(format, 0, 0, 0)
    chosen = []
    for name, module in tqdm(targets, desc=f"packing ({format})", disable=not progress or not targets):
        sparse = SparseLinear.from_linear(module, format)
        set_submodule(model, name, sparse)
        w = sparse.weight_format
        chosen.append(w.name)
        summary.layers += 1
        summary.dense_bytes += w.dense_nbytes
        summary.compressed_bytes += w.nbytes
    summary.format = format_label(format, chosen)
    if summary.layers == 0:
        raise ValueError("sparsify_ found no linear layers to convert in the model")
    return summary
