"""Run-time compilation and launch of the CUDA kernels, through NVRTC and the CUDA driver (ctypes).

Why not CuPy or `torch.utils.cpp_extension`: the kernels include no CUDA header (see
``cuda/common.cuh``), so NVRTC compiles them with no include path in ~0.1-0.5 s, and the NVRTC
library already ships with PyTorch's CUDA wheels (``nvidia-cuda-nvrtc``). Calling it and the driver
(``libcuda``, present wherever a GPU is) through ctypes adds no dependency at all; CuPy would add a
150 MB one, and `load_inline` spends ~45 s compiling torch's headers. `torch.cuda._compile_kernel`
does the same as this module but is private, passes every Python int as a 32-bit C int, and needs
the CUDA toolkit's headers on disk.

Nothing here runs at import: importing this module on a CPU-only machine loads no library and
initializes no CUDA. The first launch loads NVRTC and the driver, compiles the variant (cached in
memory, and on disk under ``$FLASHLLM_CACHE_DIR`` or ``~/.cache/flashllm/cubin``), and launches on
torch's current stream, so the kernels compose with torch's stream semantics and CUDA graphs (call
each shape once before capturing: compiling and module loading are not capturable).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

CUDA_DIR = "cuda"  # package-relative folder of the kernel sources
HEADER = "common.cuh"
MIN_CAPABILITY = (8, 0)  # cp.async, ldmatrix, bf16 mma, redux.sync
THREADS = 128  # the main kernels' default block: 4 warps (Tiled-CSL may run 8: LaunchConfig.warps)

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}


class KernelUnavailable(RuntimeError):
    """The fast path cannot run here (no NVRTC, no driver, an old GPU); the reference path can."""


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def kernel_source(name: str) -> str:
    """Text of a file in ``flashllm/kernels/cuda`` (package data)."""
    return resources.files(__package__).joinpath(CUDA_DIR, name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# NVRTC
# ---------------------------------------------------------------------------------------------
def _nvrtc_candidates() -> list[str]:
    """Where libnvrtc may be: an explicit path, the loader's search path, the `nvidia-*` wheels
    PyTorch depends on, and the CUDA toolkit."""
    names = []
    explicit = os.environ.get("FLASHLLM_NVRTC")
    if explicit:
        names.append(explicit)
    major = (torch.version.cuda or "").split(".")[0]
    for m in ([major] if major else []) + ["13", "12", "11"]:
        names.append(f"libnvrtc.so.{m}")
    roots = [p for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]
    for root in roots:
        names += sorted(glob.glob(os.path.join(root, "nvidia", "**", "libnvrtc.so*"), recursive=True))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            names += sorted(glob.glob(os.path.join(home, "lib*", "libnvrtc.so*")))
    names.append("libnvrtc.so")
    seen: list[str] = []
    for n in names:
        if n not in seen and "builtins" not in n and ".alt." not in n:
            seen.append(n)
    return seen


def _mapped_folder(prefix: str) -> Optional[str]:
    """Folder of a shared library already mapped into this process (Linux), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            for line in fh:
                path = line.split()[-1] if line.strip() else ""
                if os.path.basename(path).startswith(prefix):
                    return os.path.dirname(path)
    except OSError:
        pass
    return None


class Nvrtc:
    """The few NVRTC entry points needed to turn a source into a cubin (or PTX)."""

    def __init__(self) -> None:
        errors = []
        for name in _nvrtc_candidates():
            try:
                lib = ctypes.CDLL(name)
            except OSError as exc:
                errors.append(f"{name}: {exc}")
                continue
            self._preload_builtins(lib, name)
            self.lib = lib
            self.path = name
            break
        else:
            raise KernelUnavailable(
                "NVRTC (libnvrtc.so) was not found; install the CUDA build of PyTorch (it depends on "
                "nvidia-cuda-nvrtc) or set FLASHLLM_NVRTC to the library's path. Tried: "
                + "; ".join(errors[:6])
            )
        c = ctypes
        self.lib.nvrtcGetErrorString.restype = c.c_char_p
        major, minor = c.c_int(), c.c_int()
        self._check(self.lib.nvrtcVersion(c.byref(major), c.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)
        count = c.c_int()
        self._check(self.lib.nvrtcGetNumSupportedArchs(c.byref(count)), "nvrtcGetNumSupportedArchs")
        archs = (c.c_int * count.value)()
        self._check(self.lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        self.supported_archs = tuple(archs)

    @staticmethod
    def _preload_builtins(lib: ctypes.CDLL, name: str) -> None:
        # NVRTC dlopens libnvrtc-builtins by its soname; the wheels don't put their folder on the
        # loader's path, so load it from beside libnvrtc first (dlopen then finds it loaded). A
        # library found by soname is located through the process's memory map.
        folder = os.path.dirname(name) if os.path.sep in name else _mapped_folder("libnvrtc.so")
        if not folder:
            return
        for builtins in sorted(glob.glob(os.path.join(folder, "libnvrtc-builtins.so*"))):
            if ".alt." in builtins:
                continue
            try:
                ctypes.CDLL(builtins)
                return
            except OSError:
                continue

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"{what} failed: {self.lib.nvrtcGetErrorString(result).decode()}")

    def compile(self, source: str, name: str, options: Sequence[str], headers: dict[str, str],
                cubin: bool, log_sink: Optional[list] = None) -> bytes:
        """The cubin (or PTX) of `source`; the compiler's log is appended to `log_sink` if given
        (with ``--ptxas-options=-v`` among the options: registers, stack frame and spills)."""
        c = ctypes
        prog = c.c_void_p()
        header_texts = (c.c_char_p * len(headers))(*(t.encode() for t in headers.values()))
        header_names = (c.c_char_p * len(headers))(*(n.encode() for n in headers))
        self._check(
            self.lib.nvrtcCreateProgram(c.byref(prog), source.encode(), name.encode(), len(headers),
                                        header_texts, header_names),
            "nvrtcCreateProgram",
        )
        try:
            opts = (c.c_char_p * len(options))(*(o.encode() for o in options))
            result = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = c.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, c.byref(size))
            log = c.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, log)
            if result != 0:
                raise RuntimeError(
                    f"NVRTC failed to compile {name} with {' '.join(options)}:\n{log.value.decode()}"
                )
            if log_sink is not None:
                log_sink.append(log.value.decode(errors="replace"))
            get_size, get = (
                (self.lib.nvrtcGetCUBINSize, self.lib.nvrtcGetCUBIN)
                if cubin
                else (self.lib.nvrtcGetPTXSize, self.lib.nvrtcGetPTX)
            )
            self._check(get_size(prog, c.byref(size)), "nvrtcGet(CUBIN|PTX)Size")
            image = c.create_string_buffer(size.value)
            self._check(get(prog, image), "nvrtcGet(CUBIN|PTX)")
            return image.raw
        finally:
            self.lib.nvrtcDestroyProgram(c.byref(prog))

    def target(self, capability: tuple[int, int]) -> tuple[str, bool]:
        """(``--gpu-architecture`` value, whether it yields a cubin). A GPU newer than this NVRTC
        gets PTX for the newest architecture it knows, which the driver compiles at load."""
        cc = capability[0] * 10 + capability[1]
        if cc in self.supported_archs:
            return f"sm_{cc}", True
        older = [a for a in self.supported_archs if a <= cc]
        if not older:
            raise KernelUnavailable(f"this NVRTC {self.version} cannot target compute capability {capability}")
        return f"compute_{max(older)}", False


# ---------------------------------------------------------------------------------------------
# CUDA driver
# ---------------------------------------------------------------------------------------------
CU_FUNC_ATTRIBUTE_NUM_REGS = 4
CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


class Driver:
    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise KernelUnavailable(f"the CUDA driver (libcuda.so.1) could not be loaded: {exc}") from None
        c = ctypes
        self.lib.cuLaunchKernel.argtypes = [
            c.c_void_p, c.c_uint, c.c_uint, c.c_uint, c.c_uint, c.c_uint, c.c_uint, c.c_uint,
            c.c_void_p, c.c_void_p, c.c_void_p,
        ]
        self.lib.cuModuleLoadData.argtypes = [c.c_void_p, c.c_char_p]
        self.lib.cuModuleGetFunction.argtypes = [c.c_void_p, c.c_void_p, c.c_char_p]
        self.lib.cuFuncSetAttribute.argtypes = [c.c_void_p, c.c_int, c.c_int]
        self.lib.cuFuncGetAttribute.argtypes = [c.c_void_p, c.c_int, c.c_void_p]
        self.lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [c.c_void_p, c.c_void_p, c.c_int, c.c_size_t]
        self.lib.cuCtxSetCurrent.argtypes = [c.c_void_p]
        self._check(self.lib.cuInit(0), "cuInit")
        self._contexts: dict[int, int] = {}
        # Programmatic dependent launches (`programmatic=True`) go through cuLaunchKernelEx (CUDA
        # 11.8+), one attribute, set up once.
        self._launch_ex = getattr(self.lib, "cuLaunchKernelEx", None)
        if self._launch_ex is not None:
            self._launch_ex.argtypes = [c.POINTER(_LaunchConfig), c.c_void_p, c.c_void_p, c.c_void_p]
        self._programmatic = ctypes.pointer(
            _LaunchAttribute(id=CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1))

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            text = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.byref(name))
            self.lib.cuGetErrorString(result, ctypes.byref(text))
            raise RuntimeError(
                f"{what} failed with {(name.value or b'?').decode()} ({result}): {(text.value or b'').decode()}"
            )

    def use_device(self, index: int) -> None:
        """Make the device's primary context current on this thread: the one PyTorch allocates and
        launches in, so the module, the tensors and the stream all belong to the same context."""
        ctx = self._contexts.get(index)
        if ctx is None:
            dev = ctypes.c_int()
            self._check(self.lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
            handle = ctypes.c_void_p()
            self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(handle), dev), "cuDevicePrimaryCtxRetain")
            ctx = self._contexts[index] = handle.value
        current = ctypes.c_void_p()
        self._check(self.lib.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
        if current.value != ctx:
            self._check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def device_attribute(self, index: int, attribute: int) -> int:
        dev, value = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, dev), "cuDeviceGetAttribute")
        return value.value

    def load(self, image: bytes, name: str) -> int:
        module = ctypes.c_void_p()
        self._check(self.lib.cuModuleLoadData(ctypes.byref(module), image), "cuModuleLoadData")
        func = ctypes.c_void_p()
        self._check(self.lib.cuModuleGetFunction(ctypes.byref(func), module, name.encode()), "cuModuleGetFunction")
        return func.value

    def get_attribute(self, func: int, attribute: int) -> int:
        value = ctypes.c_int()
        self._check(self.lib.cuFuncGetAttribute(ctypes.byref(value), attribute, func), "cuFuncGetAttribute")
        return value.value

    def set_attribute(self, func: int, attribute: int, value: int) -> None:
        self._check(self.lib.cuFuncSetAttribute(func, attribute, value), "cuFuncSetAttribute")

    def occupancy(self, func: int, threads: int, smem: int) -> int:
        blocks = ctypes.c_int()
        self._check(
            self.lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(blocks), func, threads, smem),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor",
        )
        return blocks.value

    def launch(self, func: int, grid: tuple[int, int, int], block: tuple[int, int, int], smem: int,
               stream: int, args: "KernelArgs", programmatic: bool = False) -> None:
        """Launch on `stream`; with `programmatic`, as a programmatic dependent launch: the grid may
        start before the kernel ahead of it in the stream has finished, and must wait for it
        (`wait_for_prior_grids` in cuda/common.cuh) before reading anything that kernel writes."""
        if not programmatic:
            self._check(
                self.lib.cuLaunchKernel(func, *grid, *block, smem, stream, args.pointers, None), "cuLaunchKernel"
            )
            return
        if self._launch_ex is None:
            raise KernelUnavailable("this CUDA driver has no cuLaunchKernelEx (programmatic dependent launch)")
        config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), smem, stream,
                               self._programmatic, 1)
        self._check(self._launch_ex(ctypes.byref(config), func, args.pointers, None), "cuLaunchKernelEx")


@dataclass(frozen=True)
class Param:
    """A kernel argument with its C type: pointers are 64-bit, sizes 32- or 64-bit integers."""

    value: int
    kind: str  # "ptr", "i32" or "i64"

    def ctype(self) -> Union[ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64]:
        if self.kind == "ptr":
            return ctypes.c_void_p(self.value)
        if self.kind == "i32":
            if not -(2**31) <= self.value < 2**31:
                raise ValueError(f"kernel argument {self.value} does not fit in 32 bits")
            return ctypes.c_int32(self.value)
        return ctypes.c_int64(self.value)


class KernelArgs:
    """A kernel's arguments as the driver takes them (an array of pointers to C values), converted
    once for launches that repeat (`LaunchPlan`): each launch then sets only the arguments that
    change, the tensors' addresses, under `lock`, so two threads sharing one cannot mix their
    values between setting them and the launch (which copies them)."""

    def __init__(self, params: Sequence[Param]) -> None:
        self.kinds = [p.kind for p in params]
        self.values = [p.ctype() for p in params]
        self.pointers = (ctypes.c_void_p * len(self.values))(*(ctypes.addressof(v) for v in self.values))
        self.lock = threading.Lock()

    def set(self, index: int, value: int) -> None:
        """Argument `index` becomes `value` (a tensor's `data_ptr()`, 0 for none, or an integer)."""
        if self.kinds[index] == "i32" and not -(2**31) <= value < 2**31:
            raise ValueError(f"kernel argument {value} does not fit in 32 bits")
        self.values[index].value = value


def ptr(t: Optional[torch.Tensor]) -> Param:
    return Param(0 if t is None else t.data_ptr(), "ptr")


def i32(v: int) -> Param:
    return Param(int(v), "i32")


def i64(v: int) -> Param:
    return Param(int(v), "i64")


# ---------------------------------------------------------------------------------------------
# Compiled kernels
# ---------------------------------------------------------------------------------------------
@dataclass
class CompiledKernel:
    name: str
    func: int
    smem: int  # dynamic shared memory the launch asks for
    registers: int
    local_bytes: int  # stack/spill bytes per thread (0 expected)
    occupancy: int  # resident blocks per multiprocessor at `smem` and `threads`
    device: int
    threads: int = THREADS  # the block size it is written for

    def launch(self, grid: tuple[int, int, int], params: Union[Sequence[Param], KernelArgs], stream: int,
               changes: Sequence[tuple[int, int]] = (), programmatic: bool = False) -> None:
        """Launch on `stream` with `params`, or with prepared `KernelArgs` after setting `changes`
        ((index, value) pairs) in them; `programmatic`: see `Driver.launch`."""
        args = params if isinstance(params, KernelArgs) else KernelArgs(params)
        driver = _state().driver
        with args.lock:
            for index, value in changes:
                args.set(index, value)
            driver.launch(self.func, grid, (self.threads, 1, 1), self.smem, stream, args, programmatic)


class _State:
    def __init__(self) -> None:
        self.nvrtc = Nvrtc()
        self.driver = Driver()
        self.kernels: dict[tuple, CompiledKernel] = {}
        self.lock = threading.Lock()


_STATE: Optional[_State] = None
_STATE_ERROR: Optional[KernelUnavailable] = None


def _state() -> _State:
    global _STATE, _STATE_ERROR
    if _STATE is None:
        if _STATE_ERROR is not None:
            raise _STATE_ERROR
        try:
            _STATE = _State()
        except KernelUnavailable as exc:
            _STATE_ERROR = exc
            raise
    return _STATE


def nvrtc() -> Nvrtc:
    """The NVRTC library (loaded on first use); works on a machine without a GPU."""
    return _state().nvrtc if _STATE is not None else _nvrtc_only()


_NVRTC_ONLY: Optional[Nvrtc] = None


def _nvrtc_only() -> Nvrtc:
    global _NVRTC_ONLY
    if _NVRTC_ONLY is None:
        _NVRTC_ONLY = Nvrtc()
    return _NVRTC_ONLY


def availability() -> tuple[bool, str]:
    """(whether the CUDA kernels can run here, why or why not), for `flashllm info`. Loads NVRTC and
    the driver if needed; does not initialize CUDA in PyTorch."""
    from . import ENV_FLAG, FAST_KERNELS

    registered = any(device == "cuda" for _, device in FAST_KERNELS)
    try:
        state = _state()
    except KernelUnavailable as exc:
        return False, str(exc)
    flag = "registered" if registered else f"not registered ({ENV_FLAG}=0)"
    return registered, f"NVRTC {state.nvrtc.version[0]}.{state.nvrtc.version[1]} ({state.nvrtc.path}); {flag}"


def builds_for(arch: str, defines: dict[str, int]) -> bool:
    """Whether a variant with `defines` compiles for `arch` (an NVRTC target): the warpgroup-MMA
    variants (FLASHLLM_WGMMA) exist on sm_90 alone, the programmatic-launch ones (FLASHLLM_PDL) from
    sm_90 on, every other variant on all of them."""
    if defines.get("FLASHLLM_WGMMA"):
        return arch in ("sm_90", "sm_90a")
    if defines.get("FLASHLLM_PDL"):
        from .configs import pdl_capable

        return pdl_capable(arch)
    return True


def compile_options(arch: str, defines: dict[str, int], dtype: torch.dtype) -> list[str]:
    if defines.get("FLASHLLM_WGMMA"):
        # wgmma is an sm_90a instruction (arch-specific: no later GPU runs it).
        if not builds_for(arch, defines):
            raise KernelUnavailable(f"the warpgroup MMA (wgmma) variants run on sm_90 GPUs (H100, H200) only, "
                                    f"not on {arch}")
        arch = "sm_90a"
    elif not builds_for(arch, defines):
        raise KernelUnavailable(f"programmatic dependent launch (pdl) needs sm_90 or later, not {arch}")
    opts = [f"--gpu-architecture={arch}", "--std=c++17", f"-DFLASHLLM_DTYPE={_DTYPE_CODES[dtype]}"]
    opts += [f"-D{k}={v}" for k, v in sorted(defines.items())]
    if os.environ.get("FLASHLLM_LINEINFO") == "1":  # for compute-sanitizer and ncu source views
        opts.append("--generate-line-info")
    return opts


def compile_image(source_file: str, kernel_name: str, options: list[str], cubin: bool,
                  compiler: Optional[Nvrtc] = None) -> bytes:
    """Compile one variant, through the on-disk cache keyed by everything that shapes the output."""
    compiler = compiler or nvrtc()
    source = kernel_source(source_file)
    headers = {HEADER: kernel_source(HEADER)}
    key = hashlib.sha256(
        "\0".join([source, headers[HEADER], *options, str(compiler.version), str(cubin), kernel_name]).encode()
    ).hexdigest()[:32]
    cache = _cache_dir()
    path = cache / f"{key}.{'cubin' if cubin else 'ptx'}" if cache else None
    if path is not None and path.is_file():
        try:
            return path.read_bytes()
        except OSError:
            pass
    image = compiler.compile(source, source_file, options, headers, cubin)
    if path is not None:
        try:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(image)
            os.replace(tmp, path)
        except OSError:
            pass
    return image


def _cache_dir() -> Optional[Path]:
    root = os.environ.get("FLASHLLM_CACHE_DIR")
    if root == "":
        return None
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "flashllm", "cubin")
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return Path(root)


def get_kernel(source_file: str, kernel_name: str, defines: dict[str, int], dtype: torch.dtype,
               device: torch.device, smem: int, threads: int = THREADS) -> CompiledKernel:
    """The compiled kernel for this variant on this device, compiling and loading it once."""
    state = _state()
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (source_file, kernel_name, tuple(sorted(defines.items())), dtype, index, smem, threads)
    kernel = state.kernels.get(key)
    if kernel is not None:
        return kernel
    with state.lock:
        kernel = state.kernels.get(key)
        if kernel is not None:
            return kernel
        capability = torch.cuda.get_device_capability(index)
        if capability < MIN_CAPABILITY:
            raise KernelUnavailable(f"compute capability {capability} is below {MIN_CAPABILITY}")
        limit = state.driver.device_attribute(index, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        if smem > limit:
            raise KernelUnavailable(f"{kernel_name} needs {smem} bytes of shared memory; this GPU allows {limit}")
        arch, cubin = state.nvrtc.target(capability)
        image = compile_image(source_file, kernel_name, compile_options(arch, defines, dtype), cubin, state.nvrtc)
        with torch.cuda.device(index):  # torch's current device and the driver's context agree
            state.driver.use_device(index)
            func = state.driver.load(image, kernel_name)
            if smem > 48 * 1024:
                state.driver.set_attribute(func, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
            kernel = CompiledKernel(
                name=kernel_name,
                func=func,
                smem=smem,
                registers=state.driver.get_attribute(func, CU_FUNC_ATTRIBUTE_NUM_REGS),
                local_bytes=state.driver.get_attribute(func, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
                occupancy=state.driver.occupancy(func, threads, smem),
                device=index,
                threads=threads,
            )
        state.kernels[key] = kernel
        return kernel


# The raw handle, without the `torch.cuda.Stream` object `current_stream` builds around it (a few
# µs of every eager launch); what Triton's launcher calls too. Absent from CPU-only builds.
_raw_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(device: torch.device) -> int:
    """Torch's current stream on `device`, as a CUstream handle; also makes the device's context
    current for the driver calls that follow."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    _state().driver.use_device(index)
    if _raw_current_stream is not None:
        return _raw_current_stream(index)
    return torch.cuda.current_stream(device).cuda_stream


def on_device(device: torch.device):
    """`torch.cuda.device(device)`, or no context where `device` is already torch's current device
    (the usual case: entering and leaving the guard costs every eager launch a few µs)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# ---------------------------------------------------------------------------------------------
# Pieces shared by the format launchers
# ---------------------------------------------------------------------------------------------
def prepare_activations(x2d: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int, int]:
    """(activations, row stride, valid columns rounded up to 8) in the form the kernels read: unit
    column stride, 16-byte aligned rows, and zeros from `in_features` up to a multiple of 8 (the
    kernels copy 8 columns at a time, and a weight's zero padding times garbage could be NaN)."""
    k8 = -(-in_features // 8) * 8
    ok = (
        x2d.stride(1) == 1
        and x2d.stride(0) % 8 == 0
        and x2d.data_ptr() % 16 == 0
        and in_features % 8 == 0
    )
    if ok:
        return x2d, x2d.stride(0), k8
    padded = x2d.new_zeros((x2d.shape[0], k8))
    padded[:, :in_features] = x2d
    return padded, k8, k8


def output_buffer(out: Optional[torch.Tensor], n: int, out_features: int, x2d: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty((n, out_features), dtype=x2d.dtype, device=x2d.device)
    if out.shape != (n, out_features) or out.dtype != x2d.dtype or out.device != x2d.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous ({n}, {out_features}) {x2d.dtype} tensor on {x2d.device}, got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def check_aligned(name: str, t: torch.Tensor, alignment: int = 16) -> None:
    if t.data_ptr() % alignment:
        raise ValueError(
            f"{name} starts at an address not aligned to {alignment} bytes (a view into a larger "
            "buffer?); the kernel reads it with 16-byte copies: pass a contiguous copy"
        )


def split_plan(k_tiles: int, split_k: int) -> tuple[int, int]:
    """(blocks along K, tiles per block) for a requested split; never leaves a block empty."""
    split_k = max(1, min(int(split_k), k_tiles))
    per = -(-k_tiles // split_k)
    return -(-k_tiles // per), per


@dataclass(frozen=True)
class SplitKWorkspace:
    sums: torch.Tensor  # fp32 partial sums, (N, M) row-major from the start; zero between launches
    counters: torch.Tensor  # int32, one per output tile: blocks arrived; zero between launches


_WORKSPACES: dict[tuple[str, int], SplitKWorkspace] = {}
_RETIRED: list[SplitKWorkspace] = []
_WORKSPACE_LOCK = threading.Lock()


def splitk_workspace(device: torch.device, stream: int, floats: int, tiles: int) -> SplitKWorkspace:
    """Zeroed partial sums (at least `floats`) and arrival counters (at least `tiles`) for split-K
    launches that end in their last block (`LaunchConfig.fixup`) on `stream`.

    The kernels leave both zero again, so they are zeroed once, when allocated, instead of by a
    memset before every call: that launch and the finalize one are what `fixup` saves. One per stream:
    launches on one stream run in order, while two streams sharing one would race. A workspace that
    grows is kept, never freed: a CUDA graph captured with it keeps its address. Allocated while a
    graph is captured, it comes from the graph's memory pool and its zeroing is captured too (it then
    runs again at each replay, on a workspace that is already zero)."""
    key = (str(device), stream)
    with _WORKSPACE_LOCK:
        ws = _WORKSPACES.get(key)
        if ws is not None and ws.sums.numel() >= floats and ws.counters.numel() >= tiles:
            return ws
        if ws is not None:  # grown geometrically: few retired workspaces, at most the size of the last
            _RETIRED.append(ws)
            have_floats, have_tiles = ws.sums.numel(), ws.counters.numel()
            floats = have_floats if floats <= have_floats else max(floats, 2 * have_floats)
            tiles = have_tiles if tiles <= have_tiles else max(tiles, 2 * have_tiles)
        ws = SplitKWorkspace(torch.zeros(max(floats, 1), dtype=torch.float32, device=device),
                             torch.zeros(max(tiles, 1), dtype=torch.int32, device=device))
        _WORKSPACES[key] = ws
        return ws


def finalize_job(rezero: bool, pdl: bool = False) -> tuple[str, str, dict[str, int]]:
    """(source file, kernel name, defines) of the split-K epilogue, with or without re-zeroing, as a
    programmatic dependent launch or not."""
    defines = {"FLASHLLM_REZERO": 1} if rezero else {}
    if pdl:
        defines["FLASHLLM_PDL"] = 1
    return "splitk_finalize.cu", "flashllm_splitk_finalize", defines


@dataclass(frozen=True)
class SplitKFinalize:
    """The split-K epilogue's launch for one output shape, prepared: `run` sets the three tensors."""

    kernel: CompiledKernel
    grid: tuple[int, int, int]
    args: KernelArgs
    programmatic: bool = False  # launched to overlap the split blocks' tail (FLASHLLM_PDL)

    def run(self, ws: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor, stream: int) -> None:
        """y = round(ws + bias) (the workspace's first y.numel() floats left zero if it rezeroes)."""
        self.kernel.launch(self.grid, self.args, stream,
                           ((0, ws.data_ptr()), (1, 0 if bias is None else bias.data_ptr()), (2, y.data_ptr())),
                           self.programmatic)


def splitk_finalize(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
                    rezero: bool = False, pdl: bool = False) -> SplitKFinalize:
    """The split-K epilogue for a (rows x cols) `dtype` output on `device`, with or without
    re-zeroing the workspace it reads, as a programmatic dependent launch or not."""
    kernel = get_kernel(*finalize_job(rezero, pdl), dtype, device, 0, threads=256)
    total = rows * cols
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = max(1, min(-(-total // kernel.threads), sms * 8))
    return SplitKFinalize(kernel, (blocks, 1, 1), KernelArgs([ptr(None), ptr(None), ptr(None), i32(cols), i64(total)]),
                          pdl)


# ---------------------------------------------------------------------------------------------
# Tuning (opt-in: `flashllm bench kernels --tune`, or FLASHLLM_RETUNE=1 on a missing table key)
# ---------------------------------------------------------------------------------------------
def time_call(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` by CUDA events (the first calls compile and are not timed).

    L2 is flushed before every timed call (a compressed layer of a few tens of MB would otherwise
    be served from the 50-60 MB L2 of an H100/H200) by reading a buffer, which leaves clean lines
    as a decode step's layers do (zeroing it left dirty lines whose write-back slowed the
    bandwidth-bound calls: BENCHMARKS.md, eleventh session), and the flush also queues enough GPU
    work that the host's launch overhead does not show as idle time between the events."""
    for _ in range(warmup):
        fn()
    device = torch.device("cuda", torch.cuda.current_device())
    times = sorted(flushed_times(fn, l2_flusher(device, "read", _l2_flush_bytes()), reps, device))
    return times[len(times) // 2]


def flushed_times(fn, flush: Callable[[], object], reps: int, device: torch.device) -> list[float]:
    """Milliseconds of `reps` calls of `fn`, each after `flush()` and between two CUDA events, all
    enqueued before one synchronization (no host gap is timed)."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def l2_flusher(device: torch.device, kind: str, nbytes: int) -> Callable[[], object]:
    """A call that pushes whatever a timed call reads out of L2, through a buffer of `nbytes`:
    "read" sums it, leaving clean lines (as between a decode step's layers), "write" zeroes it as
    triton's do_bench does, leaving dirty lines whose write-back the next call pays."""
    buffer = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    if kind == "write":
        return buffer.zero_
    total = torch.empty((), dtype=torch.float32, device=device)
    return lambda: torch.sum(buffer, dim=0, out=total)


def _l2_flush_bytes() -> int:
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
    return max(2 * int(l2), 128 * 2**20)


def output_problem(y: torch.Tensor, ref: torch.Tensor, tolerance: float = 1e-2) -> Optional[str]:
    """What is wrong with a kernel's output `y` against the fp32 product `ref`, or None. The bound
    (1% of the output's largest magnitude) is far above fp16/bf16 rounding and far below what a
    wrong index or a dropped value gives."""
    if not bool(torch.isfinite(y).all()):
        return "non-finite output"
    scale = float(ref.abs().max().clamp_min(1e-6))
    err = float((y.float() - ref).abs().max())
    return None if err <= tolerance * scale else f"max error {err:.3g} against an output scale of {scale:.3g}"


def tune(run, candidates, reps: int = 20, timer=None, check=None):
    """(best candidate, its median ms, all timings) for `run(candidate)`; candidates that cannot
    run here (too much shared memory, say) are skipped. `timer(fn)` -> ms replaces `time_call`.
    `check(output)` -> None, or what is wrong with a candidate's output: such a candidate is
    skipped with a warning instead of timed, so a wrong variant can never win."""
    timings = []
    for cfg in candidates:
        try:
            call = lambda cfg=cfg: run(cfg)  # noqa: E731
            problem = check(call()) if check is not None else None
            if problem:
                warnings.warn(f"flashllm: tuning skipped {cfg}: {problem}", stacklevel=2)
                continue
            timings.append((timer(call) if timer is not None else time_call(call, reps), cfg))
        except KernelUnavailable:
            continue
    if not timings:
        raise KernelUnavailable("no candidate configuration ran (correctly) on this GPU")
    best_ms, best = min(timings, key=lambda t: t[0])
    return best, best_ms, timings


def prebuild(arch: str, folder: Optional[str] = None, checked: bool = False) -> int:
    """Compile every shipped variant (with `checked`, every variant the GPU tests run:
    `configs.checked_variants`), both dtypes, the split-K epilogue and the expansion kernels for
    `arch` into the on-disk cache, on any machine with NVRTC (no GPU needed). Carrying the folder
    to a GPU machine with the same NVRTC version (and FLASHLLM_CACHE_DIR pointing at it) skips its
    compiles."""
    if folder is not None:
        os.environ["FLASHLLM_CACHE_DIR"] = folder
    compiler = nvrtc()
    count = 0
    for source, name, defines in build_jobs(checked):
        if not builds_for(arch, defines):
            continue
        for dtype in _DTYPE_CODES:
            compile_image(source, name, compile_options(arch, defines, dtype), True, compiler)
            count += 1
    return count


def build_jobs(checked: bool = False) -> list[tuple[str, str, dict[str, int]]]:
    """(source file, kernel name, defines) of every kernel a launch can compile: the split-K
    epilogue, the expansion kernels and every shipped variant (with `checked`, every variant the GPU
    tests run: `configs.checked_variants`). What `prebuild` and scripts/compile_check.sh build."""
    from . import configs

    jobs = [finalize_job(False), finalize_job(True), finalize_job(True, pdl=True),
            ("bitmap_expand.cu", "flashllm_bitmap_expand", {}),
            ("tiled_csl_expand.cu", "flashllm_tiled_csl_expand", {}),
            ("tiled_csl16_expand.cu", "flashllm_tiled_csl16_expand", {})]
    for fmt, cfg in configs.checked_variants() if checked else configs.shipped_variants():
        jobs.append((configs.kernel_source(fmt), f"flashllm_{fmt}_spmm", cfg.defines(fmt)))
    return jobs


if __name__ == "__main__":
    # python -m flashllm.kernels.launch prebuild sm_90 [folder] [--checked]
    args = [a for a in sys.argv[1:] if a != "--checked"]
    if len(args) >= 2 and args[0] == "prebuild":
        n = prebuild(args[1], args[2] if len(args) > 2 else None, checked="--checked" in sys.argv)
        print(f"compiled {n} variants for {args[1]} into {_cache_dir()}")
    else:
        print("usage: python -m flashllm.kernels.launch prebuild sm_90 [cache folder] [--checked]", file=sys.stderr)
        sys.exit(2)
