"""End-to-end decode benchmark: dense against sparse models, one harness for both.

Models are built from their published configurations with random weights (throughput does not
depend on the values), layer by layer on the target device, so a model whose dense weights would
not fit (OPT-175B on one H200) is never materialized dense: each linear weight is drawn, pruned
and packed before the next one exists. Decoding uses `flashllm.decode.StaticDecoder` (static KV
cache, one CUDA graph per step) for dense and sparse alike, so the comparison isolates the linear
layers. With ``--predict``, each distinct linear shape is also timed alone, dense and sparse, and
the speedup those kernel times predict for a whole decode step is printed next to the measured one.
Each row records the SM clock NVML read during its timed generation (`sm_mhz`, bench/clocks.py).

    flashllm bench e2e --models llama-2-7b,llama-2-13b --sparsities 0.5,0.7,0.8 --batch 1,8,16,32
    flashllm bench e2e --big            # OPT-66B and OPT-175B at 80% on one GPU
    flashllm bench e2e --kernel-options fixup   # the sparse runs with a kernel option forced (A/B)
    flashllm bench e2e --compile        # the decode step (dense and sparse) through torch.compile
    flashllm bench e2e --compile both   # each model and batch timed without and with it
    flashllm bench e2e --tiny           # a CPU smoke run of the harness itself
    flashllm bench e2e --profile-prefill out/   # where each model's time to first token goes

`--profile-prefill DIR` runs one more prefill of each model at the first batch size under
torch.profiler and writes, per model, the ops and kernels by their own device (or, on a CPU, host)
time to DIR, with a summary line: the prefill's wall time, the device time of the sparse kernels
(flashllm_*), of everything else on the device, and the host time not covered by device work. The
time to first token of a sparse model was 2-3x the dense one's on an H200 (BENCHMARKS.md, eleventh
and sixteenth sessions), more than the kernels' own times explain; this says where it goes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .clocks import SmClock
from .csvlog import append_rows

# Published architectures (Hugging Face config fields); no download needed.
CONFIGS = {
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "llama-2-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                  num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                  max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "opt-30b": ("opt", dict(hidden_size=7168, ffn_dim=28672, num_hidden_layers=48, num_attention_heads=56,
                            vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=7168)),
    "opt-66b": ("opt", dict(hidden_size=9216, ffn_dim=36864, num_hidden_layers=64, num_attention_heads=72,
                            vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=9216)),
    "opt-175b": ("opt", dict(hidden_size=12288, ffn_dim=49152, num_hidden_layers=96, num_attention_heads=96,
                             vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=12288)),
    "tiny": ("llama", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)),
}
# Flash-LLM's reported tokens per GPU-second (A100s, batch 8/16/32/64) for the --big runs' table.
PAPER_TOKENS_PER_GPU_SECOND = {
    "opt-66b": "Flash-LLM on 2 A100: 110 / 198 / 342 / 522; FasterTransformer on 4: 65 / 122 / 215 / 360",
    "opt-175b": "Flash-LLM on 4 A100: 45-195; FasterTransformer on 8: 23-127",
}


def make_config(name: str):
    from transformers import LlamaConfig, OPTConfig

    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(CONFIGS)}")
    family, fields = CONFIGS[name]
    return (LlamaConfig if family == "llama" else OPTConfig)(**fields)


# Weights compared with the pruning cut per pass: 64 MiB of float32 temporaries.
_PRUNE_CHUNK = 1 << 24


@torch.no_grad()
def build_model(config, sparsity: Optional[float], fmt: str, dtype: torch.dtype, device: torch.device,
                progress: bool = False) -> nn.Module:
    """A random-weight model, each linear layer drawn (and packed) directly on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from tqdm.auto import tqdm

    from ..formats import format_for
    from ..layers import linear_layers, set_submodule
    from ..nn import SparseLinear
    from ..prune.patterns import parse_sparsity

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    target = None if sparsity is None else parse_sparsity(sparsity)
    if target is not None and target.is_nm:
        raise ValueError(f"the end-to-end benchmark prunes to a fraction of zeros, not to {target}")
    layers = list(linear_layers(model))
    for name, module in tqdm(layers, desc="building", disable=not progress):
        weight = random_pruned_weight(module.out_features, module.in_features,
                                      0.0 if target is None else target.fraction, device, dtype)
        bias = None if module.bias is None else torch.zeros(module.out_features, device=device, dtype=dtype)
        if target is None:
            dense = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            dense.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                dense.bias = nn.Parameter(bias, requires_grad=False)
            set_submodule(model, name, dense)
        else:
            set_submodule(model, name, SparseLinear(format_for(fmt, weight).from_dense(weight), bias))
        del weight
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                setattr(module, pname, nn.Parameter(_random_like(pname, param, device, dtype), requires_grad=False))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.to(device).eval()


def random_pruned_weight(rows: int, cols: int, sparsity: float, device: torch.device,
                         dtype: torch.dtype, std: float = 0.02) -> torch.Tensor:
    """A (rows x cols) weight drawn from N(0, std^2), its smallest magnitudes zeroed.

    Magnitude pruning at the Gaussian's own quantile instead of a selection: ``|w| < std *
    ndtri((1 + s) / 2)`` is dropped, a few million weights at a time, so no layer is sorted (an
    exact selection on CUDA sorts it: values plus int64 indices, 12 bytes per weight, for each of
    OPT-175B's 576 layers). The layer's sparsity is the target to within a few
    sqrt(s (1 - s) / n), under 1e-3 for every layer of the benchmarked models, which a throughput
    benchmark cannot tell from exact; the kernel and checkpoint tests prune exactly.
    """
    weight = torch.empty(rows, cols, device=device, dtype=dtype)
    cut = std * torch.special.ndtri(torch.tensor((1 + sparsity) / 2, dtype=torch.float64)).item()
    for part in weight.split(max(1, _PRUNE_CHUNK // cols)):
        # Drawn and cut in float32, then rounded: cutting bf16 draws would count every weight
        # rounded onto the grid point just below the cut, 0.2% of the layer at 50%.
        draw = torch.randn(part.shape, device=device) * std
        part.copy_(draw.masked_fill_(draw.abs() < cut, 0))
    return weight


def _random_like(name: str, param: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if param.dim() == 1:  # norm scales 1, biases 0: activations keep a sane scale
        return (torch.ones if name == "weight" else torch.zeros)(param.shape, device=device, dtype=dtype)
    return torch.randn(param.shape, device=device, dtype=dtype) * 0.02


def linear_weight_bytes(model: nn.Module) -> int:
    from ..layers import linear_layers
    from ..nn import SparseLinear

    total = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            total += module.weight_format.nbytes
    for _, module in linear_layers(model):
        total += module.weight.numel() * module.weight.element_size()
    return total


def _median_ms(fn, device: torch.device) -> float:
    """Median time of `fn` in ms with the kernel benchmark's timer (CUDA events, L2 flushed; wall
    clock on the CPU), around a CUDA-graph replay of it on the GPU: the decode steps are graphs
    too, so the host's launch overhead must not count here either."""
    from .kernels import _graphed, _timer

    fn()
    return _timer(device, warmup_ms=5, rep_ms=20)(_graphed(fn, device)[0])


@torch.no_grad()
def linear_time_ms(model: nn.Module, batch: int, device: torch.device) -> float:
    """Sum over the model's linear layers of one layer's median time at `batch` tokens."""
    from ..layers import linear_layers
    from ..nn import SparseLinear

    per_shape: dict[tuple, float] = {}
    total = 0.0
    modules = [m for m in model.modules() if isinstance(m, SparseLinear)] + [m for _, m in linear_layers(model)]
    for module in modules:
        # "auto" can pack two layers of one shape in different formats
        key = (type(module).__name__, getattr(module, "format_cls", None), module.in_features, module.out_features)
        if key not in per_shape:
            x = torch.randn(batch, module.in_features, device=device, dtype=module.weight_dtype
                            if isinstance(module, SparseLinear) else module.weight.dtype)
            per_shape[key] = _median_ms(lambda: module(x), device)
        total += per_shape[key]
    return total


@dataclass
class Row:
    model: str
    variant: str
    sparsity: float
    format: str
    batch: int
    prompt: int
    new_tokens: int
    decode_tokens_per_s: float
    tokens_per_gpu_s: float
    ttft_ms: float
    step_ms: float
    peak_memory_gib: float
    linear_weight_gib: float
    cuda_graph: bool
    predicted_speedup: float
    measured_speedup: float
    device: str
    torch: str
    date: str
    sm_mhz: float = float("nan")  # median SM clock during the timed generation (NVML; nan without it)
    compiled: bool = False  # the decode step ran through torch.compile (--compile)


# --compile: which decode steps each model and batch is timed with (torch.compile or not).
COMPILE_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def run_one(model: nn.Module, batch: int, prompt: int, new_tokens: int, vocab: int, device: torch.device,
            graphs: bool, compiled: bool = False) -> dict:
    from ..decode import StaticDecoder

    decoder = StaticDecoder(model, batch, prompt + new_tokens, cuda_graph=graphs, compiled=compiled)
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    decoder.generate(ids, min(8, new_tokens))  # warm-up: allocator, cuBLAS handles, kernels
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = SmClock(device)
    with clock:
        result = decoder.generate(ids, new_tokens)
    total = result.prefill_seconds + result.decode_seconds
    return {
        "decode_tokens_per_s": result.decode_tokens_per_second,
        "tokens_per_gpu_s": batch * new_tokens / total,
        "ttft_ms": result.prefill_seconds * 1e3,
        "step_ms": result.decode_seconds / max(new_tokens - 1, 1) * 1e3,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0) / 2**30,
        "cuda_graph": result.cuda_graph,
        "compiled": result.compiled,
        "sm_mhz": clock.median_mhz or float("nan"),
    }


def _self_device_us(event) -> float:
    # (torch 2.x renamed self_cuda_time_total to self_device_time_total)
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


def profile_prefill(model: nn.Module, batch: int, prompt: int, vocab: int, device: torch.device,
                    path: Path) -> str:
    """One prefill of `batch` x `prompt` tokens (after a warm-up one) under torch.profiler: writes
    the ops and kernels by their own device time (host time on a CPU) to `path` and returns a
    summary line (wall time; device time of the flashllm kernels, of everything else; host time
    the device did not cover)."""
    from torch.profiler import ProfilerActivity, profile

    from ..decode import StaticDecoder

    cuda = device.type == "cuda"
    decoder = StaticDecoder(model, batch, prompt + 1, cuda_graph=False)
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    decoder.generate(ids, 1)  # one new token: the prefill alone; plans, checks and allocations warmed
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        decoder.generate(ids, 1)  # (it synchronizes the device before it returns)
        wall_ms = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    table = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30)
    device_ms = sparse_ms = 0.0
    sparse_calls = 0
    if cuda:
        from torch.autograd import DeviceType

        for event in events:
            # The device's own events (kernels, copies, memsets): a host op's row repeats its kernels' time.
            ms = _self_device_us(event) / 1e3
            if getattr(event, "device_type", None) != DeviceType.CUDA or ms <= 0:
                continue
            device_ms += ms
            if event.key.startswith("flashllm_"):
                sparse_ms += ms
                sparse_calls += event.count
    summary = (f"prefill {path.stem}: {wall_ms:.1f} ms wall; device {device_ms:.1f} ms, of which flashllm kernels "
               f"(products, split-K epilogues, expansions) {sparse_ms:.1f} ms in {sparse_calls} launches and the rest "
               f"{device_ms - sparse_ms:.1f} ms; wall time the device was not busy {max(wall_ms - device_ms, 0.0):.1f} ms"
               if cuda else
               f"prefill {path.stem}: {wall_ms:.1f} ms wall on the CPU (no device timeline)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{summary}\n\n{table}\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="llama-2-7b,llama-2-13b,opt-30b",
                        help=f"comma-separated, from {', '.join(sorted(CONFIGS))}")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8")
    parser.add_argument("--batch", default="1,8,16,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--format", default="bitmap",
                        help="bitmap, tiled_csl, tiled_csl16 or auto (each layer in the faster format at its sparsity)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")
    parser.add_argument("--compile", nargs="?", const="on", default="off", choices=COMPILE_MODES,
                        help="run the decode step (dense and sparse alike) through torch.compile, which fuses the "
                             "small kernels outside the linear layers; each model and batch compiles once. "
                             "`--compile both` times each model and batch both ways, uncompiled first")
    parser.add_argument("--predict", action="store_true",
                        help="also time each linear shape alone and print the speedup it predicts")
    parser.add_argument("--big", action="store_true", help="OPT-66B and OPT-175B at 80%% (sparse only), one GPU")
    parser.add_argument("--tiny", action="store_true", help="a small CPU-sized model: checks the harness")
    parser.add_argument("--kernel-options", help="force kernel options on every sparse product, e.g. fixup or "
                        "bitmap:fit (sets FLASHLLM_KERNEL_OPTIONS; recorded in the format column)")
    parser.add_argument("--profile-prefill", type=Path, metavar="DIR",
                        help="profile one prefill per model at the first batch size (torch.profiler) into DIR")
    parser.add_argument("--csv", type=Path, default=Path("bench-results/e2e.csv"), help="rows are appended")
    parser.add_argument("--plot", type=Path, default=Path("bench-results/e2e.png"))


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    if args.tiny:
        models, batches, prompt, new = ["tiny"], _ints(args.batch)[:2], min(args.prompt_len, 16), min(args.new_tokens, 8)
    else:
        models, batches, prompt, new = args.models.split(","), _ints(args.batch), args.prompt_len, args.new_tokens
    sparsities = _floats(args.sparsities)
    plans = [(m, [None, *sparsities]) for m in models]
    if args.big:
        plans = [("opt-66b", [0.8]), ("opt-175b", [0.8])]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    from ..formats import check_format_name
    from ..kernels.configs import FORCED_OPTIONS_ENV, forced_options

    if args.kernel_options is not None:
        os.environ[FORCED_OPTIONS_ENV] = args.kernel_options
    check_format_name(args.format)  # a misspelt format or option fails here, not after the models are built
    forced_options(args.format)
    forced = os.environ.get(FORCED_OPTIONS_ENV, "").strip()
    sparse_label = f"{args.format} [{forced}]" if forced else args.format
    date = datetime.date.today().isoformat()
    rows: list[Row] = []
    for name, variants in plans:
        config = make_config(name)
        dense_by_batch: dict[tuple[int, bool], tuple[float, float]] = {}  # (batch, compiled) -> ms
        for sparsity in variants:
            try:
                model = build_model(config, sparsity, args.format, dtype, device, progress=True)
            except torch.cuda.OutOfMemoryError:
                print(f"{name} {'dense' if sparsity is None else sparsity}: out of GPU memory while building")
                continue
            weight_gib = linear_weight_bytes(model) / 2**30
            linear_ms: dict[int, float] = {}  # batch -> the linear layers' time alone (--predict)
            for batch, compiled in itertools.product(batches, COMPILE_MODES[args.compile]):
                try:
                    stats = run_one(model, batch, prompt, new, config.vocab_size, device, not args.no_graphs,
                                    compiled)
                except torch.cuda.OutOfMemoryError:
                    print(f"{name} {sparsity} batch {batch}: out of GPU memory")
                    torch.cuda.empty_cache()
                    continue
                if args.predict and batch not in linear_ms:
                    linear_ms[batch] = linear_time_ms(model, batch, device)
                step_linear_ms = linear_ms.get(batch, float("nan"))
                if sparsity is None:
                    dense_by_batch[batch, compiled] = (stats["step_ms"], step_linear_ms)
                    predicted = measured = 1.0
                elif (batch, compiled) in dense_by_batch:
                    dense_step, dense_linear = dense_by_batch[batch, compiled]
                    measured = dense_step / stats["step_ms"]
                    predicted = (dense_step / (dense_step - dense_linear + step_linear_ms) if args.predict
                                 else float("nan"))
                else:
                    predicted = measured = float("nan")
                rows.append(Row(name, "dense" if sparsity is None else "flashllm", sparsity or 0.0,
                                "dense" if sparsity is None else sparse_label, batch, prompt, new,
                                predicted_speedup=predicted, measured_speedup=measured, linear_weight_gib=weight_gib,
                                device=device_name, torch=torch.__version__, date=date, **stats))
                print(_format_row(rows[-1]), flush=True)
                _write_csv(rows[-1:], args.csv)  # as it comes: a run cut short keeps what it measured
                if args.profile_prefill is not None and batch == batches[0] and not compiled:
                    label = f"{name}_{'dense' if sparsity is None else f's{sparsity:g}_{args.format}'}_b{batch}"
                    try:  # a diagnosis: the measured rows stand whatever the profiler does
                        print(profile_prefill(model, batch, prompt, config.vocab_size, device,
                                              args.profile_prefill / f"{label}.txt"), flush=True)
                    except (RuntimeError, OSError) as err:
                        print(f"prefill {label}: not profiled ({type(err).__name__}: {err})", flush=True)
            del model
            if args.compile != "off":
                torch._dynamo.reset()  # compiled steps' caches and guards may still refer to the model
            gc.collect()  # the next model's peak memory must not include this one
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not rows:
        print("no rows measured")
        return 1
    print(f"\n{_table(rows)}\n\nrows appended to {args.csv}")
    if args.big:
        for name in ("opt-66b", "opt-175b"):
            print(f"paper, {name}: {PAPER_TOKENS_PER_GPU_SECOND[name]}")
    _plot(rows, args.plot)
    return 0


def _format_row(r: Row) -> str:
    return (f"{r.model:11s} {r.variant:8s} s={r.sparsity:.1f} b={r.batch:3d}: {r.decode_tokens_per_s:9.1f} tok/s, "
            f"step {r.step_ms:7.2f} ms, ttft {r.ttft_ms:7.1f} ms, peak {r.peak_memory_gib:6.1f} GiB, "
            f"linear weights {r.linear_weight_gib:6.2f} GiB, speedup {r.measured_speedup:.2f}x "
            f"(predicted {r.predicted_speedup:.2f}x){'' if r.cuda_graph else ', eager'}{', compiled' if r.compiled else ''}"
            + ("" if r.sm_mhz != r.sm_mhz else f" @ {r.sm_mhz:.0f} MHz"))


def _table(rows: list[Row]) -> str:
    head = "| model | variant | sparsity | batch | decode tok/s | tok/GPU-s | TTFT ms | peak GiB | linear GiB | speedup | predicted |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r.model} | {r.variant} | {r.sparsity:.0%} | {r.batch} | {r.decode_tokens_per_s:.1f} | "
                     f"{r.tokens_per_gpu_s:.1f} | {r.ttft_ms:.1f} | {r.peak_memory_gib:.1f} | {r.linear_weight_gib:.2f} | "
                     f"{r.measured_speedup:.2f}x | {r.predicted_speedup:.2f}x |")
    return "\n".join(lines)


def _write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    append_rows(str(path), list(Row.__dataclass_fields__), (asdict(r) for r in rows))


def _plot(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'flashllm[bench]')")
        return
    sparse = [r for r in rows if r.variant != "dense"]
    if not sparse:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in sorted({r.model for r in sparse}):
        for batch, compiled in sorted({(r.batch, r.compiled) for r in sparse}):
            pts = sorted((r.sparsity, r.measured_speedup) for r in sparse
                         if r.model == model and r.batch == batch and r.compiled == compiled)
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="--" if compiled else "-",
                        label=f"{model} batch {batch}{', compiled' if compiled else ''}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("decode speedup over dense")
    ax.set_title(f"flashllm end to end ({sparse[0].device})")
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")
