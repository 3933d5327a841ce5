"""The CUDA kernels' host side on the CPU (tests/fake_gpu.py): the launches a product makes compute
the right product from their arguments, and the launch plans kept on a weight for its eager calls
(`cuda_op.LaunchPlan`) launch what planning every call would, until the weight, the batch size or
a setting changes."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import types
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fake_gpu
from flashllm.formats import get_format
from flashllm.kernels import bitmap_cuda, configs, cuda_op, launch, tiled_csl16_cuda, tiled_csl_cuda
from flashllm.kernels.spmm import spmm
from flashllm.nn import SparseLinear

MODULES = {"bitmap": bitmap_cuda, "tiled_csl": tiled_csl_cuda, "tiled_csl16": tiled_csl16_cuda}


def random_weight(fmt: str, shape: tuple[int, int], sparsity: float, dtype=torch.float16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(shape, generator=gen)
    dense[torch.rand(shape, generator=gen) < sparsity] = 0
    dense = dense.to(dtype)
    return dense, get_format(fmt).from_dense(dense)


def check_product(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, bias=None) -> None:
    ref = x.double() @ dense.double().T + (0 if bias is None else bias.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)


def record_plans(monkeypatch, *weights) -> list[int]:
    """The N of every plan made from now on for a product of `weights` (the first-use checks plan
    products of their own weights, which do not count)."""
    planned: list[int] = []
    original = cuda_op.CudaKernel.plan

    def plan(self, n, dtype, device, tensors, *rest):
        if any(tensors[0] is next(iter(w.tensors().values())) for w in weights):
            planned.append(n)
        return original(self, n, dtype, device, tensors, *rest)

    monkeypatch.setattr(cuda_op.CudaKernel, "plan", plan)
    return planned


def options(fmt: str) -> list[configs.LaunchConfig]:
    """The launch shapes the host side treats differently: unsplit, split with a memset and an
    epilogue, split ended by the last block, split with a kept, rezeroed workspace, stream-K, and
    programmatic dependent launches (their split-K on a kept workspace, with or without the last
    block ending it)."""
    base = configs.default_config(fmt, 16, 0.5)
    if fmt == "tiled_csl16":  # no epilogue options: one launch, or split-K ended by a finalize launch
        return [replace(base, split_k=1), replace(base, split_k=3), replace(base, split_k=3, warps=8)]
    shapes = [replace(base, split_k=1), replace(base, split_k=3), replace(base, split_k=3, fixup=True),
              replace(base, split_k=3, rezero=True), replace(base, split_k=1, pdl=True),
              replace(base, split_k=3, pdl=True), replace(base, split_k=3, pdl=True, fixup=True)]
    if fmt == "bitmap":
        shapes += [replace(base, persistent=True), replace(base, persistent=True, fixup=True),
                   replace(base, persistent=True, pdl=True)]
    return shapes


@pytest.mark.parametrize("fmt", MODULES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_launch_shape_computes_the_product(monkeypatch, fmt, dtype):
    gpu = fake_gpu.install(monkeypatch)
    kernel = MODULES[fmt].KERNEL
    dense, weight = random_weight(fmt, (133, 203), 0.6, dtype)  # 203 columns: x is padded to 208
    tensors = list(weight.tensors().values())
    x = torch.randn(19, 203).to(dtype)
    bias = torch.randn(133).to(dtype)
    for cfg in options(fmt):
        for _ in range(2):  # twice: a kept workspace must be left zero for the next launch
            gpu.launches.clear()
            out = torch.full((19, 133), float("nan"), dtype=dtype)
            y = kernel.run(x, tensors, 133, 203, bias, cfg, out)
            assert y.data_ptr() == out.data_ptr()
            check_product(y, x, dense, bias)
            finalizes = len(gpu.of(fake_gpu.FINALIZE))
            assert finalizes == (0 if cfg.split_k == 1 and not cfg.persistent or cfg.fixup else 1), cfg
            # (the fake refuses a programmatic launch of a kernel built not to wait, and the reverse)
            assert [entry.programmatic for entry in gpu.launches] == [cfg.pdl] * len(gpu.launches), cfg


@pytest.mark.parametrize("fmt", ["bitmap", "tiled_csl"])  # (tiled_csl16 has no pdl)
def test_programmatic_launches_chain_without_a_memset(monkeypatch, fmt):
    """With pdl a split product is two programmatic launches on a workspace kept zero: a memset
    (torch.zeros, an ordinary kernel) between them and the kernel before would end the overlap."""
    fake_gpu.install(monkeypatch)
    dense, weight = random_weight(fmt, (133, 203), 0.6)
    tensors = list(weight.tensors().values())
    cfg = replace(configs.default_config(fmt, 16, 0.6), split_k=3, pdl=True)
    plan = MODULES[fmt].KERNEL.plan(16, torch.float16, torch.device("cpu"), tensors, 133, 203, cfg)
    assert plan.kept_workspace and plan.finalize.programmatic
    x = torch.randn(16, 203).half()
    check_product(plan.run(x), x, dense)  # (the stream's workspace may be allocated, zeroed, here)
    zeros = []
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: zeros.append(a) or torch.empty(*a, **k).zero_())
    for _ in range(2):
        x = torch.randn(16, 203).half()
        check_product(plan.run(x), x, dense)
    # (the fake's own decode allocates zeroed tensors too: only a workspace of the output's shape counts)
    assert [a for a in zeros if a and a[0] == (16, 133)] == []


@pytest.mark.parametrize("fmt", MODULES)
def test_spmm_plans_once_per_weight_and_batch(monkeypatch, fmt):
    fake_gpu.install(monkeypatch)
    dense, weight = random_weight(fmt, (200, 300), 0.7)
    planned = record_plans(monkeypatch, weight)
    bias = torch.randn(200).half()
    for n in (1, 1, 1, 16, 16, 1):
        x = torch.randn(n, 300).half()  # a fresh input every call: the plan holds no activation
        check_product(spmm(x, weight, bias), x, dense, bias)
    assert planned == [1, 16]
    x3 = torch.randn(2, 3, 300).half()  # leading dimensions flatten into the planned N = 6
    check_product(spmm(x3, weight).reshape(6, 200), x3.reshape(6, 300), dense)
    assert planned == [1, 16, 6]


def test_a_weight_packed_under_inference_mode_keeps_its_plan_without_raising(monkeypatch):
    # An inference tensor has no version counter: reading it raised (and the error was caught) on
    # every eager call, ~10 µs each; the plan must still be kept and reused.
    fake_gpu.install(monkeypatch)
    with torch.inference_mode():
        dense, weight = random_weight("bitmap", (200, 300), 0.7)
        planned = record_plans(monkeypatch, weight)
        raised = []
        original = torch.Tensor._version

        def version(t):
            try:
                return original.__get__(t)
            except RuntimeError:
                raised.append(t)
                raise

        monkeypatch.setattr(torch.Tensor, "_version", property(version))
        for _ in range(3):
            x = torch.randn(4, 300).half()
            check_product(spmm(x, weight), x, dense)
    assert planned == [4] and raised == []


def test_a_changed_weight_or_setting_is_planned_again(monkeypatch):
    gpu = fake_gpu.install(monkeypatch)
    dense, weight = random_weight("bitmap", (128, 640), 0.8)
    other_dense, other = random_weight("bitmap", (128, 640), 0.8, seed=1)
    planned = record_plans(monkeypatch, weight, other)
    x = torch.randn(4, 640).half()
    check_product(spmm(x, weight), x, dense)
    assert len(planned) == 1

    # The runs changed in place (their version moves): fitted buffers must be sized again.
    weight.offsets.add_(0)
    check_product(spmm(x, weight), x, dense)
    assert len(planned) == 2

    # Tensors replaced by equal copies at new addresses: the kept plan points at the old ones.
    weight.values = weight.values.clone()
    check_product(spmm(x, weight), x, dense)
    assert len(planned) == 3

    # A setting that changes the launch: forced options (here the last block rounds the splits).
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "fixup")
    gpu.launches.clear()
    check_product(spmm(x, weight), x, dense)
    assert len(planned) == 4
    assert [plan.cfg.fixup for plan in weight.offsets._flashllm_plans.values()] == [False, True]
    assert gpu.launches[-1].name == bitmap_cuda.KERNEL.kernel  # no epilogue launch after it

    # Another weight of the same shape has its own plans.
    check_product(spmm(x, other), x, other_dense)
    assert len(planned) == 5
    check_product(spmm(x, weight), x, dense)
    assert len(planned) == 5


def test_a_tuned_entry_is_planned_again(monkeypatch):
    fake_gpu.install(monkeypatch)
    monkeypatch.setattr(configs, "_overlay", {})
    dense, weight = random_weight("tiled_csl", (256, 512), 0.5)
    x = torch.randn(8, 512).half()
    spmm(x, weight)
    before = weight.words._flashllm_plans.copy()
    tuned = replace(configs.default_config("tiled_csl", 8, 0.5), split_k=2)
    configs.remember(configs.key_for("sm90", "tiled_csl", 256, 512, 8, 0.5), tuned)
    check_product(spmm(x, weight), x, dense)
    added = [plan for key, plan in weight.words._flashllm_plans.items() if key not in before]
    assert [plan.cfg for plan in added] == [tuned]


def test_no_plan_is_kept_from_a_capture(monkeypatch):
    fake_gpu.install(monkeypatch, capturing=True)
    dense, weight = random_weight("bitmap", (64, 64), 0.5)
    x = torch.randn(3, 64).half()
    check_product(spmm(x, weight), x, dense)
    assert not getattr(weight.offsets, "_flashllm_plans", None)


def test_a_plan_refuses_what_it_was_not_made_for(monkeypatch):
    fake_gpu.install(monkeypatch)
    dense, weight = random_weight("bitmap", (64, 128), 0.5)
    tensors = list(weight.tensors().values())
    kernel = bitmap_cuda.KERNEL
    x = torch.randn(5, 128).half()
    cfg = kernel.launch_config(x, tensors, 64, 128, None, None)
    plan = kernel.plan(5, x.dtype, x.device, tensors, 64, 128, cfg)
    check_product(plan.run(x), x, dense)
    with pytest.raises(ValueError, match=r"planned for x of shape \(5, 128\)"):
        plan.run(torch.randn(6, 128).half())
    with pytest.raises(ValueError, match="bias must be"):
        plan.run(x, torch.randn(63).half())
    args = plan.args
    with pytest.raises(ValueError, match="does not fit in 32 bits"):
        args.set(args.kinds.index("i32"), 2**31)


def test_the_fake_gpu_catches_a_wrong_argument(monkeypatch):
    # The fake computes from the arguments it is given: a launch told the wrong row stride of the
    # activations reads the wrong rows, as the kernel would.
    fake_gpu.install(monkeypatch)
    dense, weight = random_weight("tiled_csl", (128, 64), 0.5)
    rows = torch.randn(8, 64).half()
    x = rows[:4]
    tensors = list(weight.tensors().values())
    cfg = replace(tiled_csl_cuda.KERNEL.launch_config(x, tensors, 128, 64, None, None), split_k=1)
    plan = tiled_csl_cuda.KERNEL.plan(4, x.dtype, x.device, tensors, 128, 64, cfg)
    check_product(plan.run(x), x, dense)
    stride_index = len(tensors) + 6
    original = launch.KernelArgs.set
    monkeypatch.setattr(launch.KernelArgs, "set", lambda self, i, v: original(self, i, 128 if i == stride_index else v))
    check_product(plan.run(x), rows[::2], dense)  # rows 0, 2, 4, 6


def test_a_sparse_linear_layer_takes_the_kept_plan(monkeypatch):
    fake_gpu.install(monkeypatch)
    layer = torch.nn.Linear(96, 80).half()
    with torch.no_grad():
        layer.weight[torch.rand(80, 96) < 0.6] = 0
    sparse = SparseLinear.from_linear(layer, "bitmap")
    for _ in range(3):
        x = torch.randn(7, 96).half()
        check_product(sparse(x), x, layer.weight, layer.bias)
    assert len(sparse.offsets._flashllm_plans) == 1


def test_the_host_overhead_script_prints_its_table():
    script = Path(__file__).resolve().parents[1] / "scripts" / "host_overhead.py"
    out = subprocess.run([sys.executable, str(script), "--shape", "64x96", "--n", "1,3", "--calls", "3",
                          "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("bitmap ", "tiled_csl "))]
    assert [(r[0], r[1]) for r in rows] == [("bitmap", "1"), ("bitmap", "3"), ("tiled_csl", "1"), ("tiled_csl", "3")]
    assert all(float(v) > 0 for r in rows for v in r[2:])


@pytest.mark.parametrize("fmt", MODULES)
def test_prefill_products_expand_the_weight(monkeypatch, fmt):
    gpu = fake_gpu.install(monkeypatch)
    monkeypatch.setattr(configs, "MAX_FAST_N", 8)
    dense, weight = random_weight(fmt, (70, 136), 0.7)
    bias = torch.randn(70).half()
    x = torch.randn(3, 4, 136).half()  # 12 rows > MAX_FAST_N: expansion kernel + dense product
    y = spmm(x, weight, bias)
    check_product(y.reshape(12, 70), x.reshape(12, 136), dense, bias)
    assert [entry.name for entry in gpu.launches][-1] == f"flashllm_{fmt}_expand"
    torch.testing.assert_close(MODULES[fmt].expand(weight), dense, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", MODULES)
def test_a_prefill_plans_its_expansion_once_per_weight(monkeypatch, fmt):
    gpu = fake_gpu.install(monkeypatch)
    monkeypatch.setattr(configs, "MAX_FAST_N", 8)
    planned = []
    original = cuda_op.CudaKernel.expansion_plan

    def expansion_plan(self, tensors, *rest):
        planned.append(tensors[0])
        return original(self, tensors, *rest)

    monkeypatch.setattr(cuda_op.CudaKernel, "expansion_plan", expansion_plan)
    dense, weight = random_weight(fmt, (70, 136), 0.7)
    for rows in (12, 30, 12):  # prompts of any length share the expansion
        x = torch.randn(rows, 136).half()
        check_product(spmm(x, weight), x, dense)
    assert sum(t is next(iter(weight.tensors().values())) for t in planned) == 1  # the first-use check plans its own
    assert [entry.name for entry in gpu.launches].count(f"flashllm_{fmt}_expand") >= 3
    # A weight at new addresses (a copy) gets its own plan, which expands its own bytes.
    dense2, weight2 = random_weight(fmt, (70, 136), 0.7, seed=1)
    x = torch.randn(12, 136).half()
    check_product(spmm(x, weight2), x, dense2)
    check_product(spmm(x, weight), x, dense)


def test_a_weight_keeps_its_recently_used_plans_only(monkeypatch):
    fake_gpu.install(monkeypatch)
    monkeypatch.setattr(cuda_op, "KEPT_PLANS", 3)
    dense, weight = random_weight("bitmap", (64, 64), 0.5)
    planned = record_plans(monkeypatch, weight)
    for n in (1, 2, 1, 3, 4):  # 1 is used again before 3 and 4 arrive: 2 is the one dropped
        x = torch.randn(n, 64).half()
        check_product(spmm(x, weight), x, dense)
    assert [key[0] for key in weight.offsets._flashllm_plans] == [1, 3, 4]
    spmm(torch.randn(2, 64).half(), weight)
    assert planned == [1, 2, 3, 4, 2]


def test_forced_cuda_cores_take_the_one_row_products_only(monkeypatch):
    # FLASHLLM_KERNEL_OPTIONS=tiled_csl:cores_warp on a whole model: decode steps at batch 1 launch
    # the CUDA-core build, every other batch its configured launch.
    gpu = fake_gpu.install(monkeypatch)
    monkeypatch.setenv(configs.FORCED_OPTIONS_ENV, "tiled_csl:cores_warp")
    dense, weight = random_weight("tiled_csl", (300, 200), 0.8)
    layer = SparseLinear(weight, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the option is not yet validated on a GPU: it says so
        for n in (1, 5, 1):
            gpu.launches.clear()
            x = torch.randn(n, 200).to(torch.float16)
            check_product(layer(x), x, dense)
            product = gpu.of("flashllm_tiled_csl_spmm")[-1]
            assert product.defines.get("FLASHLLM_CORES") == (2 if n == 1 else None), (n, product.defines)


def test_a_programmatic_launch_passes_the_driver_a_cuda_launch_config():
    # The real driver is not here: a stand-in library records what `Driver.launch` hands
    # cuLaunchKernelEx, read back through the structures' fields, which must lay out as cuda.h's
    # CUlaunchConfig (7 unsigned ints, the stream at 32, the attributes at 40 and their count at 48)
    # and CUlaunchAttribute (an id, 4 bytes of padding, a 64-byte value union).
    assert ctypes.sizeof(launch._LaunchConfig) == 56 and launch._LaunchConfig.stream.offset == 32
    assert launch._LaunchConfig.attrs.offset == 40 and launch._LaunchConfig.num_attrs.offset == 48
    assert ctypes.sizeof(launch._LaunchAttribute) == 72 and launch._LaunchAttribute.value.offset == 8
    seen = []

    def launch_ex(config, func, params, extra):
        cfg = config._obj
        attr = cfg.attrs[0]
        seen.append((tuple(cfg.grid), tuple(cfg.block), cfg.smem, cfg.stream, cfg.num_attrs, attr.id, attr.value,
                     func, params, extra))
        return 0

    def launch_plain(*args):
        seen.append(("plain", *args))
        return 0

    driver = launch.Driver.__new__(launch.Driver)
    driver.lib = types.SimpleNamespace(cuLaunchKernel=launch_plain)
    driver._launch_ex = launch_ex
    driver._programmatic = ctypes.pointer(
        launch._LaunchAttribute(id=launch.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1))
    args = launch.KernelArgs([launch.i32(7)])
    driver.launch(0x1234, (5, 6, 7), (128, 1, 1), 4096, 0xABC, args, programmatic=True)
    assert seen[-1] == ((5, 6, 7), (128, 1, 1), 4096, 0xABC, 1, 6, 1, 0x1234, args.pointers, None)
    driver.launch(0x1234, (5, 6, 7), (128, 1, 1), 4096, 0xABC, args)
    assert seen[-1] == ("plain", 0x1234, 5, 6, 7, 128, 1, 1, 4096, 0xABC, args.pointers, None)
    driver._launch_ex = None  # a driver older than CUDA 11.8
    with pytest.raises(launch.KernelUnavailable, match="cuLaunchKernelEx"):
        driver.launch(0x1234, (1, 1, 1), (128, 1, 1), 0, 0, args, programmatic=True)
