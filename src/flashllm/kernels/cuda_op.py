"""What both CUDA kernels share: input checks, launch-config choice, the launch, the fast-path entry.

A `CudaKernel` describes one format's kernel (its source, tile grid and tensors); `run` always runs
it and raises for inputs it cannot take, `fast_kernel` is the `flashllm::sparse_linear` entry,
returning None (so the reference path runs) for inputs the kernel does not serve: float32, old
GPUs, batches above `configs.MAX_FAST_N`, misaligned tensors, no NVRTC, or a kernel variant that
failed its first-use check on this GPU (`self_check`), warning once per reason.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable, Optional, Union

import torch

from . import configs, launch, self_check
from .launch import i32, ptr

DTYPES = (torch.float16, torch.bfloat16)
# Where the kernels run. The tests of the host side (tests/test_launch_plans.py) set "cpu" and fake
# the driver, whose launches then compute on the CPU from the arguments they are given.
KERNEL_DEVICE_TYPE = "cuda"
EXPAND_THREADS = 256  # the expansion kernels' block (cuda/*_expand.cu)
# Launch plans kept per weight (`CudaKernel.fast_kernel`), the least recently used dropped first:
# decoding uses one N, prefills one per prompt length, each plan ~2 KB of host memory.
KEPT_PLANS = 16


def _version(t: torch.Tensor) -> int:
    """`t`'s version counter (bumped by every in-place change), -1 for an inference tensor, which
    has none: what is cached on it stays (should its offsets change in place, the kernel's trap
    stops it, never a wrong result). Asked first, not caught: reading `_version` of an inference
    tensor raises, and the error cost each eager call of a model packed under `inference_mode` ~10
    µs."""
    return -1 if t.is_inference() else t._version


def largest_run(offsets: torch.Tensor) -> Optional[int]:
    """The largest difference of consecutive `offsets` (a tile's run length): one device sync on
    the first call, then cached on the tensor for its current version. None while a CUDA graph is
    being captured and nothing is cached (a sync cannot be captured: the caller falls back to
    full-tile buffers), so calling a shape once before capturing it keeps the fitted buffers."""
    version = _version(offsets)
    cached = getattr(offsets, "_flashllm_largest_run", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    if offsets.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    longest = int((offsets[1:] - offsets[:-1]).max().item()) if offsets.numel() > 1 else 0
    offsets._flashllm_largest_run = (version, longest)
    return longest


@dataclass(frozen=True, eq=False)
class LaunchPlan:
    """One product's launch with all that is fixed for a weight, an N, a dtype and a device decided
    once: the variant, its compiled kernel, the grid and split, the argument array (the weight's
    addresses and the sizes), the split-K epilogue. `CudaKernel.fast_kernel` keeps plans on the
    weight, so the eager calls of a model (prefill, Hugging Face generate) pay only `run`: the
    per-call tensors, their addresses, the launches. Resolving all of it on every call (and
    building the weight object) cost an eager `SparseLinear` call 104-200 µs of Python on a 2-core
    CPU, 1.6-3.1x what it costs now (224 layers in Llama-2-7B; BENCHMARKS.md, twelfth session)."""

    cfg: configs.LaunchConfig
    kernel: launch.CompiledKernel
    grid: tuple[int, int, int]
    args: launch.KernelArgs
    n: int
    out_features: int
    in_features: int
    reduce: bool  # split-K (or stream-K) blocks add into a workspace
    kept_workspace: bool  # ... kept zero between launches (fixup, rezero, pdl) instead of a memset per call
    output_tiles: int  # the arrival counters a kept workspace needs
    finalize: Optional[launch.SplitKFinalize]  # the epilogue launch, unless the last block rounds
    weight_ptrs: tuple[int, ...]  # where the weight's tensors were: a plan serves only those
    anchor_version: Optional[int] = None  # of the tensor it is kept on, when kept (fast_kernel)

    def serves(self, tensors: list[torch.Tensor], anchor_version: int) -> bool:
        """Whether this plan is for these tensors, with the kept-on tensor unchanged since."""
        return anchor_version == self.anchor_version and all(
            t.data_ptr() == p for t, p in zip(tensors, self.weight_ptrs))

    def run(self, x2d: torch.Tensor, bias: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x2d @ W.T (+ bias)`` into `out` (or a new tensor); x2d is (n, in_features) in the
        planned dtype on the planned device."""
        n, t = self.n, len(self.weight_ptrs)
        if x2d.shape != (n, self.in_features):
            raise ValueError(f"this launch is planned for x of shape ({n}, {self.in_features}), got {tuple(x2d.shape)}")
        CudaKernel.check_bias(bias, self.out_features, x2d)
        y = launch.output_buffer(out, n, self.out_features, x2d)
        xk, ldx, _ = launch.prepare_activations(x2d, self.in_features)
        bias = None if bias is None else bias.contiguous()
        with launch.on_device(x2d.device):
            stream = launch.current_stream(x2d.device)
            ws = counters = None
            if self.kept_workspace:
                workspace = launch.splitk_workspace(x2d.device, stream, n * self.out_features, self.output_tiles)
                ws = workspace.sums
                counters = workspace.counters if self.cfg.fixup else None  # fixup: the last block rounds it
            elif self.reduce:  # a memset, the blocks add, a finalize launch rounds
                ws = torch.zeros((n, self.out_features), dtype=torch.float32, device=x2d.device)
            self.kernel.launch(self.grid, self.args, stream, (
                (0, xk.data_ptr()), (t + 1, 0 if bias is None else bias.data_ptr()), (t + 2, y.data_ptr()),
                (t + 3, 0 if ws is None else ws.data_ptr()), (t + 6, ldx),
                (t + 11, 0 if counters is None else counters.data_ptr()),
            ), self.cfg.pdl)
            if self.finalize is not None:
                self.finalize.run(ws, bias, y, stream)
        return y


@dataclass(frozen=True, eq=False)
class ExpansionPlan:
    """One weight's expansion launch (`CudaKernel.expand`) with everything but the output fixed:
    what a prefill-sized product pays per layer instead of looking the kernel up, checking the
    weight and converting its arguments again. Kept on the weight like a `LaunchPlan`."""

    kernel: launch.CompiledKernel
    grid: tuple[int, int, int]
    args: launch.KernelArgs
    out_features: int
    in_features: int
    dtype: torch.dtype
    weight_ptrs: tuple[int, ...]
    anchor_version: Optional[int] = None
    n = None  # the plan key's row count: None names the expansion (products are planned per N)

    serves = LaunchPlan.serves

    def run(self, out: Optional[torch.Tensor] = None, device: Optional[torch.device] = None) -> torch.Tensor:
        """The dense weight, written into `out` (or a new tensor on `device`) on the current stream."""
        if out is None:
            out = torch.empty(self.out_features, self.in_features, dtype=self.dtype, device=device)
        with launch.on_device(out.device):
            self.kernel.launch(self.grid, self.args, launch.current_stream(out.device),
                               ((len(self.weight_ptrs), out.data_ptr()),))
        return out


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Optional[torch.dtype]  # None: the activations' dtype
    numel: Optional[Callable[[int, int], int]] = None  # from the tile grid (rows, cols); None: free
    aligned: bool = False  # must start on 16 bytes (vector loads)


@dataclass(frozen=True)
class CudaKernel:
    format: str  # the configs key and the format's name
    label: str  # for messages
    source: str
    kernel: str
    tile: tuple[int, int]  # rows x cols of one tile of the format's grid
    tensors: tuple[TensorSpec, ...]
    payload: str  # the tensor whose length grows with the non-zeros
    runs: Optional[str] = None  # the tile-run offsets that size fitted stage buffers (configs.FIT)
    # The source of `flashllm_<format>_expand`, which writes the dense weight for products above
    # MAX_FAST_N rows (`expand`); None: those run the reference decode.
    expand_source: Optional[str] = None
    expand_tiles: int = 1  # consecutive tiles each block of the expansion kernel writes (its TILES)
    _declined: set = field(default_factory=set, compare=False, repr=False)
    # (launch config, dtype, device index) -> what its first-use check found (None: right); self_check.
    _verdicts: dict = field(default_factory=dict, compare=False, repr=False)

    def grid(self, out_features: int, in_features: int) -> tuple[int, int]:
        return -(-out_features // self.tile[0]), -(-in_features // self.tile[1])

    def check_inputs(self, x2d: torch.Tensor, tensors: list[torch.Tensor], out_features: int, in_features: int,
                     bias: Optional[torch.Tensor]) -> None:
        """Raise for inputs no kernel could compute correctly (the messages name what is wrong)."""
        if x2d.dim() != 2 or x2d.shape[1] != in_features:
            raise ValueError(f"x must be (N, {in_features}), got {tuple(x2d.shape)}")
        if x2d.dtype not in DTYPES:
            raise TypeError(f"the {self.label} CUDA kernel takes float16 or bfloat16, got {x2d.dtype}")
        self.check_tensors(tensors, out_features, in_features, x2d.dtype, x2d.device, "x")
        self.check_bias(bias, out_features, x2d)
        if x2d.device.type != KERNEL_DEVICE_TYPE:
            raise ValueError(f"the {self.label} CUDA kernel needs CUDA tensors; x is on {x2d.device}")

    @staticmethod
    def check_bias(bias: Optional[torch.Tensor], out_features: int, x2d: torch.Tensor) -> None:
        if bias is not None and (bias.shape != (out_features,) or bias.dtype != x2d.dtype or bias.device != x2d.device):
            raise ValueError(f"bias must be ({out_features},) {x2d.dtype} on {x2d.device}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")

    def check_tensors(self, tensors: list[torch.Tensor], out_features: int, in_features: int, dtype: torch.dtype,
                      device: torch.device, what: str) -> None:
        """Raise unless `tensors` are this format's, for a weight of that shape and dtype on `device`
        (where `what`, the product's input or output, is)."""
        if len(tensors) != len(self.tensors):
            names = ", ".join(s.name for s in self.tensors)
            raise ValueError(f"the {self.format} format has {len(self.tensors)} tensors ({names}), got {len(tensors)}")
        mt, kt = self.grid(out_features, in_features)
        for spec, t in zip(self.tensors, tensors):
            expected = spec.dtype or dtype
            if t.device != device:
                raise ValueError(f"{self.format} {spec.name} is on {t.device}, {what} on {device}")
            if t.dtype != expected or t.dim() != 1 or not t.is_contiguous():
                raise TypeError(f"{self.format} {spec.name} must be a contiguous 1-D {expected} tensor, "
                                f"got {t.dtype} {tuple(t.shape)}")
            if spec.numel is not None and t.numel() != spec.numel(mt, kt):
                raise ValueError(f"{self.format} {spec.name} has {t.numel()} entries; a ({out_features} x "
                                 f"{in_features}) weight needs {spec.numel(mt, kt)}")
            launch.check_aligned(f"{self.format} {spec.name}", t, 16 if spec.aligned else 4)

    def expand(self, tensors: list[torch.Tensor], out_features: int, in_features: int, dtype: torch.dtype,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The dense (out_features x in_features) `dtype` weight these tensors store, written by one
        launch of the format's expansion kernel (`expand_source`) on torch's current stream, into
        `out` when given: what a product above MAX_FAST_N rows multiplies with cuBLAS."""
        if self.expand_source is None:
            raise ValueError(f"the {self.format} format has no expansion kernel")
        if dtype not in DTYPES:
            raise TypeError(f"the {self.label} expansion kernel takes float16 or bfloat16, got {dtype}")
        device = tensors[0].device if tensors else torch.device("cpu")
        if device.type != KERNEL_DEVICE_TYPE:
            raise ValueError(f"the {self.label} expansion kernel needs CUDA tensors, got {device}")
        if out is None:
            out = torch.empty(out_features, in_features, dtype=dtype, device=device)
        elif out.shape != (out_features, in_features) or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous ({out_features}, {in_features}) {dtype} tensor, "
                             f"got {tuple(out.shape)} {out.dtype}")
        return self.expansion_plan(tensors, out_features, in_features, dtype, out.device, "out").run(out)

    def expansion_plan(self, tensors: list[torch.Tensor], out_features: int, in_features: int,
                       dtype: torch.dtype, device: torch.device, operand: str) -> ExpansionPlan:
        """The expansion launch for these weight tensors, output unset, after checking them against
        the `dtype` and `device` of `operand` (the tensor named in an error: "out", or "x")."""
        self.check_tensors(tensors, out_features, in_features, dtype, device, operand)
        kernel = launch.get_kernel(self.expand_source, f"flashllm_{self.format}_expand", {}, dtype, device, 0,
                                   threads=EXPAND_THREADS)
        mt, kt = self.grid(out_features, in_features)
        args = launch.KernelArgs([*(ptr(t) for t in tensors), ptr(None), i32(out_features), i32(in_features), i32(kt)])
        return ExpansionPlan(kernel, (-(-mt * kt // self.expand_tiles), 1, 1), args, out_features, in_features, dtype,
                             tuple(t.data_ptr() for t in tensors))

    def expand_weight(self, weight, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`weight.to_dense()` of this format's weight object, by `expand`, into `out` when given."""
        return self.expand(list(weight.tensors().values()), *weight.shape, weight.dtype, out)

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {s.name: i for i, s in enumerate(self.tensors)}

    def tensor(self, tensors: list[torch.Tensor], name: str) -> torch.Tensor:
        """The format tensor called `name` among `tensors` (in `self.tensors` order)."""
        return tensors[self._positions[name]]

    def sparsity_of(self, tensors: list[torch.Tensor], out_features: int, in_features: int) -> float:
        """Sparsity estimated from the stored length (metadata only: no device sync)."""
        payload = self.tensor(tensors, self.payload)
        return max(0.0, 1.0 - payload.numel() / (out_features * in_features))

    def resolve_config(self, x2d: torch.Tensor, tensors: list[torch.Tensor], out_features: int, in_features: int,
                       bias: Optional[torch.Tensor], config: Optional[configs.LaunchConfig]) -> configs.LaunchConfig:
        if config is not None:
            return config.validate(self.format)
        arch = configs.arch_key(torch.cuda.get_device_capability(x2d.device))
        n, sparsity = x2d.shape[0], self.sparsity_of(tensors, out_features, in_features)
        if (configs.retune_requested() and not torch.cuda.is_current_stream_capturing()
                and configs.lookup(arch, self.format, out_features, in_features, n, sparsity) is None):
            ref = self.reference(x2d, tensors, out_features, in_features, bias)
            best, _, _ = launch.tune(
                lambda c: self.run(x2d, tensors, out_features, in_features, bias, c),
                configs.tuning_candidates(self.format, n, sparsity, self.grid(out_features, in_features)[1]),
                check=lambda y: launch.output_problem(y, ref),
            )
            configs.remember(configs.key_for(arch, self.format, out_features, in_features, n, sparsity), best)
            return best
        return configs.get_config(arch, self.format, out_features, in_features, n, sparsity)

    def reference(self, x2d: torch.Tensor, tensors: list[torch.Tensor], out_features: int, in_features: int,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The fp32 product through the format's own decode (the reference path's `_decode`): what
        retuning checks each candidate against."""
        from ..formats import get_format
        from .spmm import _decode

        dense = _decode(tensors, get_format(self.format).format_code, (out_features, in_features), x2d.dtype)
        return torch.nn.functional.linear(x2d.float(), dense.float(), None if bias is None else bias.float())

    def fit_buffers(self, cfg: configs.LaunchConfig, tensors: list[torch.Tensor]) -> configs.LaunchConfig:
        """Resolve value_cap=FIT to the smallest buffer holding the weight's longest tile run, and
        refuse an explicit cap below it (the kernel would stop on a trap)."""
        if cfg.value_cap == configs.FULL_TILE or self.runs is None:
            return cfg
        longest = largest_run(self.tensor(tensors, self.runs))
        if cfg.value_cap == configs.FIT:
            return cfg.fitted(longest)
        if longest is not None and longest > cfg.value_cap:
            raise ValueError(f"value_cap={cfg.value_cap} is below this {self.format} weight's longest tile run "
                             f"({longest} values); use value_cap=configs.FIT to size it from the weight")
        return cfg

    def compiled(self, cfg: configs.LaunchConfig, dtype: torch.dtype, device: torch.device) -> launch.CompiledKernel:
        """The kernel variant `cfg` (fitted buffers resolved) builds, compiled and loaded once."""
        return launch.get_kernel(self.source, self.kernel, cfg.defines(self.format), dtype, device,
                                 cfg.smem_bytes(self.format), cfg.threads)

    def run(self, x2d: torch.Tensor, tensors: list[torch.Tensor], out_features: int, in_features: int,
            bias: Optional[torch.Tensor] = None, config: Optional[configs.LaunchConfig] = None,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x2d @ W.T (+ bias)`` for a weight given by its tensors; x2d is (N, in_features).

        Runs the kernel unconditionally (raises `launch.KernelUnavailable` where it cannot run).
        `out`, if given, is the (N, out_features) contiguous result buffer (tests poison it first)."""
        cfg = self.launch_config(x2d, tensors, out_features, in_features, bias, config)
        if x2d.shape[0] == 0:
            return launch.output_buffer(out, 0, out_features, x2d)
        return self.plan(x2d.shape[0], x2d.dtype, x2d.device, tensors, out_features, in_features, cfg).run(x2d, bias, out)

    def launch_config(self, x2d: torch.Tensor, tensors: list[torch.Tensor], out_features: int, in_features: int,
                      bias: Optional[torch.Tensor], config: Optional[configs.LaunchConfig]) -> configs.LaunchConfig:
        """The launch `run` makes for these inputs (`config`, or the table's or the rule's, with
        fitted buffers resolved), after raising for inputs no kernel could take."""
        self.check_inputs(x2d, tensors, out_features, in_features, bias)
        return self.fit_buffers(self.resolve_config(x2d, tensors, out_features, in_features, bias, config), tensors)

    def plan(self, n: int, dtype: torch.dtype, device: torch.device, tensors: list[torch.Tensor],
             out_features: int, in_features: int, cfg: configs.LaunchConfig) -> "LaunchPlan":
        """The launch of variant `cfg` (fitted buffers resolved) for an N-row product with these
        weight tensors: the compiled kernel, grid, split and argument array, all but the per-call
        tensors fixed."""
        if cfg.cores and n > 1:  # its blocks would trap: say why here instead
            raise ValueError(f"the CUDA-core {self.label} path (cores) multiplies one activation row, got {n}")
        mt, kt = self.grid(out_features, in_features)
        kernel = self.compiled(cfg, dtype, device)
        blocks_m = -(-mt // cfg.tile_rows_per_block(self.format))
        blocks_n = -(-n // cfg.nrows)

        def slots() -> int:  # resident-block slots of the whole GPU
            return torch.cuda.get_device_properties(device).multi_processor_count * max(kernel.occupancy, 1)

        if cfg.persistent:  # stream-K: the blocks share the tile sequence, every strip's sums are added
            grid = (configs.persistent_blocks(mt * kt, slots(), blocks_n), 1, blocks_n)
            reduce, per_split = True, kt
        else:
            split = cfg.split_k
            if split == 0:
                bytes_per_element = sum(t.numel() * t.element_size() for t in tensors) / (out_features * in_features)
                split = configs.auto_split_k(kt, blocks_m * blocks_n, slots(), min(n, cfg.nrows), in_features,
                                             bytes_per_element)
            splits, per_split = launch.split_plan(kt, split)
            grid = (blocks_m, splits, blocks_n)
            reduce = splits > 1
        # A workspace kept zero between launches: by the last block (fixup) or the finalize launch
        # (rezero; and with pdl, whose chain of launches a memset between them would break).
        kept = reduce and (cfg.fixup or cfg.rezero or cfg.pdl)
        args = launch.KernelArgs([
            # pointers: activations, the format's tensors, bias, output, split-K workspace (set per call)
            ptr(None), *(ptr(t) for t in tensors), ptr(None), ptr(None), ptr(None),
            # sizes (the activations' row stride set per call)
            i32(out_features), i32(n), i32(0), i32(-(-in_features // 8) * 8), i32(kt), i32(mt), i32(per_split),
            # last: the split-K arrival counters (fixup), so the other parameters keep their offsets
            ptr(None),
        ])
        finalize = None
        if reduce and not cfg.fixup:  # a finalize launch rounds the workspace (and rezeroes it)
            finalize = launch.splitk_finalize(n, out_features, dtype, device, rezero=kept, pdl=cfg.pdl)
        return LaunchPlan(cfg, kernel, grid, args, n, out_features, in_features,
                          reduce, kept, blocks_m * blocks_n, finalize, tuple(t.data_ptr() for t in tensors))

    def first_use_problem(self, cfg: Optional[configs.LaunchConfig], dtype: torch.dtype,
                          device: torch.device) -> Optional[str]:
        """What the first-use check (`self_check`) found wrong with variant `cfg` on `device`, or
        with the expansion kernel when `cfg` is None; None when it is right, when checks are off
        (FLASHLLM_SELF_CHECK=0), or while a CUDA graph is being captured (a check synchronizes: the
        variant runs unchecked there and is checked at its next call outside a capture)."""
        if not self_check.enabled():
            return None
        index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
        key = (cfg, dtype, index)  # split_k included: a few more checks, no copy of cfg per product
        if key in self._verdicts:
            return self._verdicts[key]
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if cfg is None:
            verdict = self_check.check_expansion(self, dtype, device)
        else:
            verdict = self_check.check_variant(self, cfg, dtype, device)
        self._verdicts[key] = verdict
        return verdict

    def _decline(self, reason: str) -> None:
        if reason not in self._declined:
            self._declined.add(reason)
            warnings.warn(f"flashllm: {self.label} CUDA kernel not used ({reason}); running the reference path",
                          stacklevel=4)
        return None

    def fast_kernel(self, x: torch.Tensor, tensors: list[torch.Tensor], out_features: int, in_features: int,
                    bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The `FAST_KERNELS` entry: the product, or None to let the reference path run."""
        if x.dtype not in DTYPES:
            return None  # float32 weights: served by the reference path by design, no warning
        if len(tensors) != len(self.tensors):
            raise ValueError(f"the {self.format} format has {len(self.tensors)} tensors, got {len(tensors)}")
        x2d = x.reshape(-1, in_features)
        n = x2d.shape[0]
        # Prefill-sized batches: decode once + dense GEMM is the faster plan, by the expansion
        # kernel where there is one (and it is on), else by the reference path.
        prefill = n > configs.MAX_FAST_N
        if prefill and (self.expand_source is None or not configs.expand_enabled()):
            return None
        plan = self._kept_plan(tensors, None if prefill else n, x.dtype, x.device) if n > 0 else None
        if isinstance(plan, ExpansionPlan):
            return torch.nn.functional.linear(x, plan.run(device=x.device), bias)
        if plan is not None:
            return plan.run(x2d, bias).reshape(*x.shape[:-1], out_features)
        if torch.cuda.get_device_capability(x.device) < launch.MIN_CAPABILITY:
            return self._decline(f"compute capability {torch.cuda.get_device_capability(x.device)} < 8.0")
        misaligned = any(s.aligned and t.data_ptr() % 16 for s, t in zip(self.tensors, tensors))
        if misaligned or not all(t.is_contiguous() for t in tensors):
            return self._decline("weight tensors not contiguous or not 16-byte aligned")
        try:
            if prefill:
                problem = self.first_use_problem(None, x.dtype, x.device)
                if problem:
                    return self._decline(f"its expansion kernel failed the first-use check on this GPU: {problem}")
                plan = self.expansion_plan(tensors, out_features, in_features, x.dtype, x.device, "x")
                y = torch.nn.functional.linear(x, plan.run(device=x.device), bias)
                self._keep_plan(tensors, plan, x.dtype, x.device)
                return y
            cfg = self.launch_config(x2d, tensors, out_features, in_features, bias, None)
            if n == 0:
                return launch.output_buffer(None, 0, out_features, x2d).reshape(*x.shape[:-1], out_features)
            problem = self.first_use_problem(cfg, x.dtype, x.device)
            if problem:
                return self._decline(f"variant {cfg} failed the first-use check on this GPU: {problem}")
            plan = self.plan(n, x.dtype, x.device, tensors, out_features, in_features, cfg)
            y = plan.run(x2d, bias)
        except launch.KernelUnavailable as exc:
            return self._decline(str(exc))
        self._keep_plan(tensors, plan, x.dtype, x.device)
        return y.reshape(*x.shape[:-1], out_features)

    # Plans live on the weight tensor whose contents decide them (the tile runs that size fitted
    # buffers, else the payload), keyed by what else they depend on, so they die with the weight
    # and a changed weight (new addresses, runs changed in place) or setting is planned again. The
    # expansion's plan (n None) is kept beside the products' plans.
    def _plan_anchor(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self.tensor(tensors, self.runs or self.payload)

    @staticmethod
    def _plan_key(n: Optional[int], dtype: torch.dtype, device: torch.device) -> tuple:
        return (n, dtype, device, configs.launch_settings(), self_check.enabled())

    def _kept_plan(self, tensors: list[torch.Tensor], n: Optional[int], dtype: torch.dtype,
                   device: torch.device) -> Optional[Union[LaunchPlan, ExpansionPlan]]:
        anchor = self._plan_anchor(tensors)
        plans = getattr(anchor, "_flashllm_plans", None)
        if not plans:
            return None
        key = self._plan_key(n, dtype, device)
        plan = plans.get(key)
        if plan is None or not plan.serves(tensors, _version(anchor)):
            return None
        if next(reversed(plans)) != key:  # most recently used last: the first is evicted first
            plans[key] = plans.pop(key)
        return plan

    def _keep_plan(self, tensors: list[torch.Tensor], plan: Union[LaunchPlan, ExpansionPlan], dtype: torch.dtype,
                   device: torch.device) -> None:
        """Keep `plan` for the next call, unless it was made while a CUDA graph was being captured
        (its variant then ran unchecked, with full-tile buffers where nothing was cached: the next
        eager call plans and checks it properly)."""
        if torch.cuda.is_current_stream_capturing():
            return
        anchor = self._plan_anchor(tensors)
        plans = getattr(anchor, "_flashllm_plans", None)
        if plans is None:
            plans = anchor._flashllm_plans = {}
        key = self._plan_key(plan.n, dtype, device)
        plans.pop(key, None)
        while len(plans) >= KEPT_PLANS:  # prefills of many lengths: keep the recent ones
            plans.pop(next(iter(plans)))
        plans[key] = replace(plan, anchor_version=_version(anchor))
