"""The first-use check of CUDA kernel variants (kernels/self_check.py), on the CPU: the kernels'
emulation stands in for a launch, and planted faults stand in for a broken variant. The check on a
GPU, with the real kernels, is in test_kernels_cuda.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from flashllm.formats import get_format
from flashllm.kernels import bitmap_cuda, configs, self_check, tiled_csl16_cuda, tiled_csl_cuda
from flashllm.kernels import emulation as E
from flashllm.kernels.configs import LaunchConfig

KERNELS = {"bitmap": bitmap_cuda.KERNEL, "tiled_csl": tiled_csl_cuda.KERNEL, "tiled_csl16": tiled_csl16_cuda.KERNEL}
EMULATED = {"bitmap": lambda x, w, bias, plan: E.bitmap_kernel(x, w, bias, plan, stale=None),
            "tiled_csl": E.tiled_csl_kernel, "tiled_csl16": E.tiled_csl16_kernel}
VARIANTS = [
    ("bitmap", LaunchConfig(nrows=16)),
    ("bitmap", LaunchConfig(nrows=8, strips=2, decode="scatter", value_cap=1024)),
    ("bitmap", LaunchConfig(nrows=128)),  # N = 131: two blocks along N
    ("bitmap", LaunchConfig(nrows=16, persistent=True)),  # stream-K: 5 blocks share 12 tiles
    ("tiled_csl", LaunchConfig(nrows=16, words_per_stage=2048)),
    ("tiled_csl", LaunchConfig(nrows=32, words_per_stage=256)),  # the dense tile reloads in pieces
    ("tiled_csl16", LaunchConfig(nrows=16, words_per_stage=64)),  # over-full tiles: the rest from global memory
]


def weight_of(fmt, tensors, out_features, in_features, dtype):
    cls = get_format(fmt)
    return cls((out_features, in_features), dtype, **dict(zip(cls.tensor_names, tensors)))


def emulated_run(fmt):
    """`CudaKernel.run` through the emulation of the kernel's decode, tiles, splits and stores."""
    def run(x, tensors, out_features, in_features, bias, cfg, out):
        w = weight_of(fmt, tensors, out_features, in_features, x.dtype)
        tiles = -(-out_features // 64) * -(-in_features // 64)  # bitmap group tiles (stream-K only)
        blocks = configs.persistent_blocks(tiles, 5, -(-x.shape[0] // cfg.nrows)) if cfg.persistent else 0
        plan = E.Plan(nrows=cfg.nrows, split_k=cfg.split_k, strips=cfg.strips, decode=cfg.decode,
                      words_per_stage=cfg.words_per_stage or 2048, persistent_blocks=blocks, cores=cfg.cores,
                      warps=cfg.warps, dense_tiles=cfg.dense_tiles)
        y, _ = EMULATED[fmt](x, w, bias, plan)
        out.copy_(y)
        return out
    return run


@pytest.mark.parametrize("fmt,cfg", VARIANTS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_a_right_variant_passes(fmt, cfg, dtype):
    assert self_check.check_variant(KERNELS[fmt], cfg, dtype, torch.device("cpu"), run=emulated_run(fmt)) is None


@pytest.mark.parametrize("fmt,cfg", configs.shipped_variants(), ids=str)
def test_every_shipped_variant_passes_in_emulation(fmt, cfg):
    # A right kernel must never be declined: the check's data fits every launch the table can pick.
    assert self_check.check_variant(KERNELS[fmt], cfg, torch.float16, torch.device("cpu"), run=emulated_run(fmt)) is None


def test_the_check_weight_covers_what_breaks_kernels():
    kernel = KERNELS["tiled_csl"]
    w = self_check.check_weight(kernel, LaunchConfig(nrows=16, words_per_stage=256), torch.float16, torch.device("cpu"))
    tm, tk = kernel.tile
    assert w.shape[0] % tm and w.shape[1] % tk and -(-w.shape[1] // tk) == 4  # partial tiles, 4 along K
    assert bool((w[:tm, :tk] != 0).all())  # a full tile: denser than any stage buffer
    assert 0.3 < float((w[tm:] != 0).float().mean()) < 0.5
    # A capped bitmap buffer must hold every tile's run, or the launch is refused.
    for cap in configs.VALUE_CAPS:
        for strips in (1, 2):
            cfg = LaunchConfig(nrows=16, strips=strips, value_cap=cap)
            packed = get_format("bitmap").from_dense(self_check.check_weight(KERNELS["bitmap"], cfg, torch.float16,
                                                                             torch.device("cpu")))
            assert int((packed.offsets[1:] - packed.offsets[:-1]).max()) <= cap


def test_the_check_leaves_the_callers_random_state_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert self_check.check_variant(KERNELS["bitmap"], LaunchConfig(nrows=16), torch.float16, torch.device("cpu"),
                                    run=_planted(lambda y, cfg: None)) is None
    assert torch.equal(torch.rand(3), expected)


def _planted(fault):
    """A run whose output is the right product with `fault(y, cfg)` applied."""
    def run(x, tensors, out_features, in_features, bias, cfg, out):
        dense = weight_of("bitmap", tensors, out_features, in_features, x.dtype).to_dense()
        out.copy_(F.linear(x.float(), dense.float(), bias.float()))
        fault(out, cfg)
        return out
    return run


def _lose_a_row(y, cfg):
    y[:, 70] = 0


def _leave_one_unwritten(y, cfg):
    y[-1, -1] = float("nan")


def _double_split_sums(y, cfg):  # a split-K workspace left dirty by the previous launch
    if cfg.split_k > 1:
        y *= 2


@pytest.mark.parametrize("fault,found", [(_lose_a_row, "max error"), (_leave_one_unwritten, "non-finite"),
                                         (_double_split_sums, "split_k=3")])
def test_a_broken_variant_is_named(fault, found):
    problem = self_check.check_variant(KERNELS["bitmap"], LaunchConfig(nrows=16), torch.float16, torch.device("cpu"),
                                       run=_planted(fault))
    assert problem is not None and found in problem


def test_the_expansion_check_wants_every_bit():
    kernel = KERNELS["bitmap"]
    cpu = torch.device("cpu")
    assert self_check.check_expansion(kernel, torch.float16, cpu, expand=lambda w: w.to_dense()) is None
    assert self_check.check_expansion(kernel, torch.bfloat16, cpu, expand=lambda w: E.halves_to_float(E.bitmap_expanded(w), w.dtype)) is None

    def off_by_one(w):
        d = w.to_dense().clone()
        d[5, 7] = d[5, 7] + 1
        return d
    assert "1 of" in self_check.check_expansion(kernel, torch.float16, cpu, expand=off_by_one)


def test_each_variant_is_checked_once_and_the_switch_turns_it_off(monkeypatch):
    kernel = replace(KERNELS["bitmap"], _verdicts={})
    calls = []
    monkeypatch.setattr(self_check, "check_variant", lambda k, cfg, dtype, device: calls.append(cfg) or "planted")
    monkeypatch.setattr(self_check, "check_expansion", lambda k, dtype, device: calls.append(None))
    cpu = torch.device("cpu")
    cfg = LaunchConfig(nrows=16, split_k=4)
    assert kernel.first_use_problem(cfg, torch.float16, cpu) == "planted"
    assert kernel.first_use_problem(cfg, torch.float16, cpu) == "planted"  # remembered
    assert kernel.first_use_problem(None, torch.float16, cpu) is None  # the expansion kernel
    assert kernel.first_use_problem(replace(cfg, stages=4), torch.float16, cpu) == "planted"
    assert kernel.first_use_problem(cfg, torch.bfloat16, cpu) == "planted"
    assert calls == [cfg, None, replace(cfg, stages=4), cfg]
    monkeypatch.setenv(self_check.ENV, "0")
    assert kernel.first_use_problem(replace(cfg, stages=2), torch.float16, cpu) is None
    assert len(calls) == 4
    assert configs.default_config("bitmap", 16, 0.5).validate("bitmap")  # the configs the check takes


def test_info_says_whether_variants_are_checked(monkeypatch, cuda_kernels):
    from flashllm.kernels import kernel_path

    assert "each variant checked on first use" in kernel_path("bitmap", "cuda")
    monkeypatch.setenv(self_check.ENV, "0")
    assert "first-use checks off" in kernel_path("tiled_csl", "cuda")
