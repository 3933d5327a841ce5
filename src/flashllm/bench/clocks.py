"""The GPU's SM clock while a benchmark runs, read through NVML (the driver's management library).

A kernel's time means little without the clock it ran at: an issue-bound kernel follows the SM
clock, a memory-bound one does not, and Nsight Compute locks the clock to base by default, so its
durations and a benchmark's need not agree. `SmClock` samples the clock from a background thread
while a block of GPU work runs:

    sampler = SmClock(device)
    with sampler:
        ms = timer(fn)
    sampler.median_mhz     # None where NVML is unavailable (no NVIDIA driver, not Linux)

NVML is loaded with ctypes from the driver (libnvidia-ml.so.1), so nothing is installed for it.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
from typing import Optional

import torch

NVML_SUCCESS = 0
NVML_CLOCK_SM = 1


class _Nvml:
    """The few NVML calls used here, bound once per process."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != NVML_SUCCESS:
            raise OSError("nvmlInit_v2 failed")

    def handle(self, device: torch.device) -> ctypes.c_void_p:
        """NVML's handle for a torch CUDA device, matched by UUID (NVML and CUDA may number GPUs
        differently, e.g. under CUDA_VISIBLE_DEVICES), else by index."""
        handle = ctypes.c_void_p()
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None and self.lib.nvmlDeviceGetHandleByUUID(
                ctypes.c_char_p(f"GPU-{uuid}".encode()), ctypes.byref(handle)) == NVML_SUCCESS:
            return handle
        index = device.index if device.index is not None else torch.cuda.current_device()
        if self.lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != NVML_SUCCESS:
            raise OSError(f"NVML has no device {index}")
        return handle

    def clock(self, handle: ctypes.c_void_p, max_clock: bool = False) -> Optional[int]:
        mhz = ctypes.c_uint()
        fn = self.lib.nvmlDeviceGetMaxClockInfo if max_clock else self.lib.nvmlDeviceGetClockInfo
        return mhz.value if fn(handle, ctypes.c_int(NVML_CLOCK_SM), ctypes.byref(mhz)) == NVML_SUCCESS else None


_nvml: Optional[_Nvml] = None
_nvml_failed = False


def _load() -> Optional[_Nvml]:
    global _nvml, _nvml_failed
    if _nvml is None and not _nvml_failed:
        try:
            _nvml = _Nvml()
        except (OSError, AttributeError):
            _nvml_failed = True
    return _nvml


def max_sm_clock(device: torch.device) -> Optional[int]:
    """The SM clock's maximum (boost) in MHz, or None without NVML or a CUDA device."""
    nvml = _load() if device.type == "cuda" else None
    if nvml is None:
        return None
    try:
        return nvml.clock(nvml.handle(device), max_clock=True)
    except OSError:
        return None


class SmClock:
    """Samples the SM clock of `device` every `interval_s` seconds while used as a context manager;
    a sampler is reusable (each `with` starts a fresh set of samples)."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._nvml = _load() if device.type == "cuda" else None
        self._handle = None
        if self._nvml is not None:
            try:
                self._handle = self._nvml.handle(device)
            except OSError:
                self._nvml = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def _run(self) -> None:
        while True:
            mhz = self._nvml.clock(self._handle)
            if mhz is not None:
                self.samples.append(mhz)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "SmClock":
        self.samples = []
        if self.available:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="flashllm-sm-clock", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def median_mhz(self) -> Optional[float]:
        return float(statistics.median(self.samples)) if self.samples else None
