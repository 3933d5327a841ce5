"""The `flashllm` command: info | demo | prune | generate | eval | bench."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys

import torch

from . import __version__


def _have(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None:
        return "not installed"
    try:
        from importlib.metadata import version

        return version({"cupy": "cupy"}.get(module, module))
    except Exception:
        return "installed"


def cmd_info(args: argparse.Namespace) -> int:
    from .formats import FORMATS
    from .kernels import kernel_path

    print(f"flashllm {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print(f"CUDA available: {props.name} (sm_{props.major}{props.minor}), torch CUDA {torch.version.cuda}")
    else:
        print("CUDA available: no")
    for module in ("triton", "cupy", "transformers", "safetensors", "matplotlib"):
        print(f"{module}: {_have(module)}")
    print("kernel paths:")
    for name in FORMATS:
        for device in ("cuda", "cpu"):
            print(f"  {name:9s} on {device:4s}: {kernel_path(name, device)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashllm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flashllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices and which kernel each format uses")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        # Bad input from the command line gets one clear line, not a traceback.
        print(f"flashllm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
