"""What every compressed weight format shares: input checks, the serialized header, and packing.

A format object is a plain container of tensors plus the logical shape and dtype of the dense
weight it encodes. It never copies data on construction, so the kernels can rebuild one from a
module's buffers for free; `from_state_dict` is the validating entry point for untrusted data.

Round trips are bit-exact for every stored value; -0.0 counts as a zero (pruning cannot tell them
apart and the product does not change), so it is not stored and comes back as +0.0.

Serialized form (`state_dict()`): the format's tensors under their own names plus ``header``, an
int64 tensor ``[format_code, layout_version, out_features, in_features, dtype_code]``. Tensors only,
so the same dict goes through `torch.save` and `safetensors` unchanged.
"""

from __future__ import annotations

from typing import ClassVar

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
HEADER_KEY = "header"
HEADER_LEN = 5
HEADER_NBYTES = HEADER_LEN * 8
# Offsets are int32 so the kernels index with 32-bit arithmetic; that caps one weight's storage.
MAX_STORED_ELEMENTS = 2**31 - 1


class FormatError(ValueError):
    """Serialized sparse data that is truncated, corrupted, or from an unreadable version."""


def check_dense_weight(weight: object, name: str = "weight") -> torch.Tensor:
    """The checks every `from_dense` runs, with messages that name the offending property."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (out_features x in_features), got shape {tuple(weight.shape)}"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {weight.dtype}; supported: float16, bfloat16, float32"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(weight.shape)}")
    if weight.is_meta:
        raise ValueError(f"{name} is on the meta device and has no values to encode")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"{name} has {bad} non-finite value(s) (inf or NaN); a sparse format would store them "
            "as ordinary non-zeros and every product would be NaN, so they are refused"
        )
    return weight


def ceil_to(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_2d(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if weight.shape == (rows, cols):
        return weight
    out = weight.new_zeros(rows, cols)
    out[: weight.shape[0], : weight.shape[1]] = weight
    return out


def pack_aligned(
    counts: torch.Tensor, entries: torch.Tensor, align: int, fill: int | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay out per-tile runs of `entries` (``counts[t]`` of them for tile ``t``, in tile order),
    padding each run with `fill` to a multiple of `align`.

    Returns ``(packed, offsets)``: tile ``t`` occupies ``packed[offsets[t]:offsets[t+1]]``. Padding
    every run lets a kernel start each tile with an aligned vector load. Memory stays O(nnz): an
    entry's destination is its rank plus the padding inserted before its tile.
    """
    counts = counts.to(torch.int64)
    padded = (counts + (align - 1)) // align * align
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(padded, dim=0, out=offsets[1:])
    total = int(offsets[-1])
    if total > MAX_STORED_ELEMENTS:
        raise ValueError(
            f"the weight stores {total} entries, more than int32 offsets can index "
            f"({MAX_STORED_ELEMENTS}); split the layer"
        )
    packed = torch.full((total,), fill, dtype=entries.dtype, device=entries.device)
    if entries.numel():
        dest = torch.arange(entries.numel(), device=entries.device)
        dest += (offsets[:-1] - (torch.cumsum(counts, 0) - counts)).repeat_interleave(counts)
        packed[dest] = entries
    return packed, offsets.to(torch.int32)


def cast_finite(values: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """A value-wise cast that refuses to turn stored weights into inf (fp32 -> fp16 overflow)."""
    out = values.to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"casting the {what} weight to {dtype} overflows some values to inf")
    return out


def unpack_aligned(packed: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_aligned`: the kept entries of every row, padding dropped, in order."""
    counts = counts.to(torch.int64)
    nnz = int(counts.sum())
    if nnz == 0:
        return packed[:0]
    starts = offsets[:-1].to(torch.int64)
    src = torch.arange(nnz, device=packed.device)
    src += (starts - (torch.cumsum(counts, 0) - counts)).repeat_interleave(counts)
    return packed[src]


class SparseWeight:
    """Base class of the compressed formats; subclasses define the layout and its tensors."""

    name: ClassVar[str]
    format_code: ClassVar[int]
    # The layout version a file holds. A kernel-driven layout change bumps it; files written by an
    # older layout are converted when the format knows how (`upgradable_versions`, `upgrade_state`)
    # and otherwise refused with a clear message, never decoded wrongly.
    version: ClassVar[int]
    upgradable_versions: ClassVar[tuple[int, ...]] = ()
    tensor_names: ClassVar[tuple[str, ...]]

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, **tensors: torch.Tensor):
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        if set(tensors) != set(self.tensor_names):
            raise TypeError(f"{self.name} needs tensors {self.tensor_names}, got {sorted(tensors)}")
        for key in self.tensor_names:
            setattr(self, key, tensors[key])

    # --- subclass interface -------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "SparseWeight":
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        raise NotImplementedError

    def _validate(self) -> None:
        """Structural checks of untrusted tensors; raise FormatError naming what is wrong."""
        raise NotImplementedError

    def _cast_values(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def reads_version(cls, version: int) -> bool:
        """Whether data stored in layout `version` can be read (as is, or by `upgrade_state`)."""
        return version == cls.version or version in cls.upgradable_versions

    @classmethod
    def upgrade_state(cls, version: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors of `state`, stored in layout `version` (one of `upgradable_versions`), in
        this version's layout."""
        raise NotImplementedError

    # --- shared behaviour ---------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in self.tensor_names}

    @property
    def device(self) -> torch.device:
        return getattr(self, self.tensor_names[0]).device

    @property
    def nbytes(self) -> int:
        """Bytes stored, header included: the sum over `state_dict()` of numel * element size."""
        return HEADER_NBYTES + sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.shape[0] * self.shape[1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Move and/or cast; a cast converts each stored value as a dense cast would."""
        tensors = self.tensors()
        if dtype is not None and dtype != self.dtype:
            if dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"cannot cast {self.name} weight to {dtype}")
            tensors = self._cast_values(dtype)
        if device is not None:
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return type(self)(self.shape, dtype or self.dtype, **tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        header = torch.tensor(
            [self.format_code, self.version, *self.shape, _DTYPE_CODES[self.dtype]], dtype=torch.int64
        )
        return {HEADER_KEY: header, **self.tensors()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "SparseWeight":
        """Rebuild from `state_dict()` output, checking everything a corrupt file could break."""
        shape, dtype, version = read_header(state, cls)
        missing = [k for k in cls.tensor_names if k not in state]
        if missing:
            raise FormatError(f"{cls.name} data is missing tensor(s) {missing} (truncated file?)")
        if version != cls.version:
            state = cls.upgrade_state(version, state)
        obj = cls(shape, dtype, **{k: state[k] for k in cls.tensor_names})
        obj._validate()
        return obj

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
            f"sparsity={self.sparsity:.3f}, nbytes={self.nbytes})"
        )


def read_header(state: dict[str, torch.Tensor], cls: type[SparseWeight]) -> tuple[tuple[int, int], torch.dtype, int]:
    """(shape, dtype, layout version) from the header of `state`, checked."""
    header = state.get(HEADER_KEY)
    if header is None:
        raise FormatError(f"{cls.name} data has no '{HEADER_KEY}' tensor (not a flashllm weight?)")
    if header.dtype != torch.int64 or header.shape != (HEADER_LEN,):
        raise FormatError(
            f"{cls.name} header must be int64 of length {HEADER_LEN}, got {header.dtype} "
            f"{tuple(header.shape)}"
        )
    code, version, rows, cols, dtype_code = (int(v) for v in header.tolist())
    if code != cls.format_code:
        raise FormatError(f"data holds format code {code}, not {cls.name} ({cls.format_code})")
    if not cls.reads_version(version):
        raise FormatError(
            f"{cls.name} layout version {version} cannot be read by this flashllm, which reads "
            f"version {cls.version}; re-pack the weight from its dense or pruned checkpoint"
        )
    if dtype_code not in _CODE_DTYPES:
        raise FormatError(f"{cls.name} header names unknown dtype code {dtype_code}")
    if rows <= 0 or cols <= 0:
        raise FormatError(f"{cls.name} header has invalid shape ({rows}, {cols})")
    return (rows, cols), _CODE_DTYPES[dtype_code], version


def expect_tensor(obj: SparseWeight, key: str, dtype: torch.dtype, numel: int | None = None) -> torch.Tensor:
    t = getattr(obj, key)
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{obj.name} '{key}' is a {type(t).__name__}, not a tensor")
    if t.dtype != dtype or t.dim() != 1:
        raise FormatError(f"{obj.name} '{key}' must be 1-D {dtype}, got {t.dim()}-D {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise FormatError(
            f"{obj.name} '{key}' has {t.numel()} entries where shape {obj.shape} needs {numel} "
            "(truncated or corrupted data)"
        )
    return t


def check_offsets(obj: SparseWeight, offsets: torch.Tensor, stored: int, align: int) -> torch.Tensor:
    """Offsets must start at 0, never decrease, stay aligned and end at the stored length."""
    off = offsets.to(torch.int64)
    if int(off[0]) != 0 or int(off[-1]) != stored:
        raise FormatError(
            f"{obj.name} offsets span [{int(off[0])}, {int(off[-1])}] but {stored} entries are "
            "stored (truncated or corrupted data)"
        )
    steps = off.diff()
    if bool((steps < 0).any()) or bool((steps % align != 0).any()):
        raise FormatError(f"{obj.name} offsets are not non-decreasing multiples of {align}")
    return steps
