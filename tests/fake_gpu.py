"""A stand-in for the GPU under the CUDA kernels' host side, for tests on the CPU.

`install(monkeypatch)` fakes what `flashllm.kernels` asks of CUDA (capability, streams, device
guards, compilation, the driver) and lets the kernels take CPU tensors. Each launch then computes
on the CPU, from the arguments it is given (the tensors' addresses and the sizes, read back through
ctypes), what the kernel is specified to compute: the product into the output, or added into the
split-K workspace, which the epilogue launch (or, with `fixup`, the last block) rounds into the
output. A launch whose arguments point at the wrong tensor, carry a wrong size or skip a step gives
a wrong product here, as it would on the GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import types
from dataclasses import dataclass, field

import torch

from flashllm.formats import get_format
from flashllm.kernels import bitmap_cuda, cuda_op, launch, tiled_csl16_cuda, tiled_csl_cuda
from flashllm.kernels.spmm import FAST_KERNELS

MODULES = (bitmap_cuda, tiled_csl_cuda, tiled_csl16_cuda)
KERNELS = {k.KERNEL.kernel: k.KERNEL for k in MODULES}
EXPANSIONS = {f"flashllm_{k.FORMAT}_expand": k.KERNEL for k in MODULES}
FINALIZE = launch.finalize_job(False)[1]


def at(address: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """The `count` elements of `dtype` at `address` (a CPU tensor's memory), as a writable tensor."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    size = count * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_byte * size).from_address(address), dtype=dtype)


@dataclass
class Launch:
    name: str
    grid: tuple[int, int, int]
    args: list[int]
    defines: dict[str, int]
    programmatic: bool = False


@dataclass
class FakeGPU:
    launches: list[Launch] = field(default_factory=list)
    compiled: dict[int, tuple[tuple, launch.CompiledKernel]] = field(default_factory=dict)  # func -> (variant, kernel)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    # launch.get_kernel
    def get_kernel(self, source_file, kernel_name, defines, dtype, device, smem, threads=launch.THREADS):
        key = (kernel_name, tuple(sorted(defines.items())), dtype, smem, threads)
        for func, seen in self.compiled.items():
            if seen[0] == key:
                return seen[1]
        func = next(self._ids)
        kernel = launch.CompiledKernel(kernel_name, func, smem, 64, 0, 2, 0, threads)
        self.compiled[func] = (key, kernel)
        return kernel

    # launch.Driver.launch
    def launch(self, func, grid, block, smem, stream, args, programmatic=False) -> None:
        (name, defines, dtype, _, _), _ = self.compiled[func]
        # A programmatic launch may start before the kernel ahead of it finishes: only a kernel
        # built to wait for it (FLASHLLM_PDL) may be launched so, and one so built always is.
        if programmatic != bool(dict(defines).get("FLASHLLM_PDL")):
            raise AssertionError(f"{name} {dict(defines)} launched with programmatic={programmatic}")
        # Read through the pointer array, as the driver does: what the launch really passes.
        ctype = {"ptr": ctypes.c_uint64, "i32": ctypes.c_int32, "i64": ctypes.c_int64}
        values = [ctypes.cast(args.pointers[i], ctypes.POINTER(ctype[kind])).contents.value
                  for i, kind in enumerate(args.kinds)]
        self.launches.append(Launch(name, tuple(grid), values, dict(defines), programmatic))
        if name == FINALIZE:
            self._finalize(values, dtype, dict(defines))
        elif name in EXPANSIONS:
            self._expand(EXPANSIONS[name], values, dtype)
        else:
            self._product(KERNELS[name], grid, values, dtype)

    def use_device(self, index: int) -> None:
        pass

    @staticmethod
    def _weight(kernel: cuda_op.CudaKernel, tensor_at: list[int], m: int, k: int, mt: int, kt: int,
                dtype: torch.dtype) -> torch.Tensor:
        """The dense (m x k) weight the format's tensors at these addresses store."""
        offsets = at(tensor_at[-1], mt * kt + 1, torch.int32)
        tensors = {}
        for spec, address in zip(kernel.tensors, tensor_at):
            numel = spec.numel(mt, kt) if spec.numel else int(offsets[-1])
            tensors[spec.name] = at(address, numel, spec.dtype or dtype)
        return get_format(kernel.format)((m, k), dtype, **tensors).to_dense()

    @classmethod
    def _expand(cls, kernel: cuda_op.CudaKernel, values: list[int], dtype: torch.dtype) -> None:
        count = len(kernel.tensors)
        out_at, m, k, kt = values[count:]
        weight = cls._weight(kernel, values[:count], m, k, -(-m // kernel.tile[0]), kt, dtype)
        at(out_at, m * k, dtype).view(m, k).copy_(weight)

    @classmethod
    def _product(cls, kernel: cuda_op.CudaKernel, grid, values: list[int], dtype: torch.dtype) -> None:
        count = len(kernel.tensors)
        x_at, tensor_at = values[0], values[1 : 1 + count]
        bias_at, y_at, ws_at, m, n, ldx, kx, kt, mt, per_split, counters_at = values[1 + count :]
        # kx (in_features rounded up to 8) columns: the padding is zero in the weight and in x.
        weight = cls._weight(kernel, tensor_at, m, kx, mt, kt, dtype)
        x = at(x_at, (n - 1) * ldx + kx, dtype).as_strided((n, kx), (ldx, 1))
        product = x.double() @ weight.double().T
        if grid[1] > 1:  # split along K: every tile in exactly one block, and sums to add into
            assert ws_at and per_split * (grid[1] - 1) < kt <= per_split * grid[1], (grid, per_split, kt)
        y = at(y_at, n * m, dtype).view(n, m)
        bias = at(bias_at, m, dtype).double() if bias_at else 0.0
        if not ws_at:
            y.copy_(product + bias)
            return
        ws = at(ws_at, n * m, torch.float32).view(n, m)
        assert not ws.any(), "a split-K workspace must be zero before the blocks add into it"
        if counters_at:  # fixup: the last block to arrive rounds the sums and leaves them zero
            y.copy_(product + bias)
        else:
            ws += product.float()

    @staticmethod
    def _finalize(values: list[int], dtype: torch.dtype, defines: dict[str, int]) -> None:
        ws_at, bias_at, y_at, cols, total = values
        ws = at(ws_at, total, torch.float32).view(-1, cols)
        bias = at(bias_at, cols, dtype).float() if bias_at else 0.0
        at(y_at, total, dtype).view(-1, cols).copy_(ws + bias)
        if defines.get("FLASHLLM_REZERO"):
            ws.zero_()

    def of(self, name: str) -> list[Launch]:
        return [entry for entry in self.launches if entry.name == name]


def install(monkeypatch, capturing: bool = False) -> FakeGPU:
    """Fake the GPU for the kernels' host side on CPU tensors; `spmm` on the CPU then takes the
    fast path. `capturing`: as if a CUDA graph were being captured."""
    gpu = FakeGPU()
    state = types.SimpleNamespace(driver=gpu, kernels={}, lock=None)
    monkeypatch.setattr(launch, "_state", lambda: state)
    monkeypatch.setattr(launch, "get_kernel", gpu.get_kernel)
    monkeypatch.setattr(launch, "current_stream", lambda device: 0)
    monkeypatch.setattr(cuda_op, "KERNEL_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(multi_processor_count=132))
    for module in MODULES:
        code = get_format(module.FORMAT).format_code
        monkeypatch.setitem(FAST_KERNELS, (code, "cpu"), module.fast_kernel)
    return gpu
