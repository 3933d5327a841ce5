"""Compressed checkpoints: a Hugging Face model folder whose linear layers are stored sparse.

A flashllm checkpoint is an ordinary Hugging Face folder (``config.json``, tokenizer files,
``generation_config.json``) whose weights are safetensors shards holding, for every packed layer,
the format's tensors and header instead of a dense ``weight``, plus ``flashllm.json`` naming the
packed layers, their formats and layout versions.

Loading never materializes a dense weight: the model skeleton is built with its parameters on the
meta device, each packed layer becomes a `SparseLinear` straight from its stored tensors (read onto
the target device), and only the small dense tensors (embeddings, norms, biases) are allocated.
Converting a dense checkpoint streams it tensor by tensor, so neither the dense model nor the whole
compressed one has to fit in memory at once.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .formats import FORMATS, SparseWeight, check_format_name, format_for, get_format
from .formats.base import HEADER_KEY
from .layers import dense_weight, is_conv1d, linear_layers, set_submodule
from .nn import SparseLinear, format_of_header

MANIFEST = "flashllm.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 4 * 2**30
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "generation_config.json",
)


def is_flashllm_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


# --- writing -------------------------------------------------------------------------------------

class _ShardWriter:
    """Accumulates tensors and writes safetensors shards of at most `max_bytes` each."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor]] = []
        self.weight_map: dict[str, int] = {}
        self.total_bytes = 0
        self._temp_names: list[Path] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self._temp_names)
        path = self.folder / f".shard-{index:05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self._temp_names.append(path)
        for name in self.pending:
            self.weight_map[name] = index
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self._temp_names:
            self._flush()
        count = len(self._temp_names)
        if count == 1:
            self._temp_names[0].replace(self.folder / SINGLE)
            (self.folder / INDEX).unlink(missing_ok=True)
            return
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for temp, final in zip(self._temp_names, names):
            temp.replace(self.folder / final)
        (self.folder / SINGLE).unlink(missing_ok=True)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())},
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))


def _clean_config(config):
    config = copy.deepcopy(config)
    # A model loaded from GGUF carries its quantization settings; the saved weights are not GGUF.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return config


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tied duplicates (safetensors refuses shared storage) + alias map."""
    state, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.data_ptr(), tensor.shape, tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        state[name] = tensor
    return state, aliases


def _write_manifest(folder: Path, sparse_layers: dict[str, str], aliases: dict[str, str], stats: dict) -> None:
    formats = sorted(set(sparse_layers.values()))
    manifest = {
        "flashllm_version": __version__,
        "format_versions": {name: FORMATS[name].version for name in formats},
        "sparse_layers": sparse_layers,
        "tied": aliases,
        **stats,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer=None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    info: Optional[dict] = None,
) -> Path:
    """Write a sparsified Hugging Face model (and its tokenizer) as a compressed checkpoint.

    `info` (JSON-serializable) is stored in ``flashllm.json``, e.g. how the model was pruned.
    """
    sparse_layers = {n: m.format_cls.name for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    if not sparse_layers:
        raise ValueError("the model has no SparseLinear layers: run flashllm.sparsify_(model) before saving")
    if not hasattr(model, "config"):
        raise TypeError("save_pretrained needs a Hugging Face model (one with a .config)")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _clean_config(model.config).save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    state, aliases = _unique_state(model)
    writer = _ShardWriter(folder, max_shard_bytes)
    for name, tensor in state.items():
        writer.add(name, tensor)
    writer.close()
    modules = dict(model.named_modules())
    dense = sum(modules[n].weight_format.dense_nbytes for n in sparse_layers)
    compressed = sum(modules[n].weight_format.nbytes for n in sparse_layers)
    stats = {"dense_linear_bytes": dense, "compressed_linear_bytes": compressed, "info": info or {}}
    _write_manifest(folder, sparse_layers, aliases, stats)
    return folder


# --- reading -------------------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    file = folder / MANIFEST
    if not file.is_file():
        raise ValueError(f"{folder} is not a flashllm checkpoint: it has no {MANIFEST}")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    for key in ("format_versions", "sparse_layers"):
        if not isinstance(manifest.get(key), dict):
            raise ValueError(f"{file} is malformed: '{key}' is missing or not an object")
    for name, version in manifest["format_versions"].items():
        cls = get_format(name)
        if not cls.reads_version(version):
            raise ValueError(
                f"{folder} stores {name} layout version {version}; this flashllm ({__version__}) reads "
                f"version {cls.version}. Re-convert it from the dense checkpoint."
            )
    return manifest


class _TensorFiles:
    """Lazy access to the tensors of a folder's safetensors files, each read onto `device`."""

    def __init__(self, folder: Path, device: torch.device, stack: ExitStack):
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE).is_file():
            files = [SINGLE]
            weight_map = None
        else:
            raise FileNotFoundError(f"{folder} has no {SINGLE} and no {INDEX}")
        device_name = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
        self.handles = {}
        for file in files:
            if not (folder / file).is_file():
                raise FileNotFoundError(f"{folder / file} is listed in {INDEX} but missing")
            self.handles[file] = stack.enter_context(safe_open(str(folder / file), framework="pt", device=device_name))
        self.location = {}
        for file, handle in self.handles.items():
            for key in handle.keys():
                self.location[key] = file
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.location))
            if missing:
                raise ValueError(f"{folder} index names tensors absent from its shards, e.g. {missing[:3]}")

    def keys(self) -> list[str]:
        return list(self.location)

    def __contains__(self, key: str) -> bool:
        return key in self.location

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.location[key]].get_tensor(key)


def _empty_model(config, dtype: Optional[torch.dtype]):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # Parameters on the meta device (no memory); buffers such as rotary frequencies stay real,
    # since they are computed at construction and not stored in checkpoints.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


def from_pretrained(
    path: str | os.PathLike,
    device: Optional[str | torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> nn.Module:
    """Load a flashllm checkpoint onto `device` (default: CUDA when available, else CPU)."""
    from transformers import AutoConfig

    folder = Path(path)
    manifest = read_manifest(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = AutoConfig.from_pretrained(str(folder))
    with ExitStack() as stack:
        files = _TensorFiles(folder, device, stack)
        model = _empty_model(config, dtype)
        consumed = set()
        layers = manifest["sparse_layers"]
        for name in tqdm(layers, desc="loading sparse layers", disable=not progress):
            consumed |= _install_sparse_layer(model, files, name, layers[name], dtype)
        rest = {}
        for key in files.keys():
            if key in consumed:
                continue
            tensor = files.get(key)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            rest[key] = tensor
        result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{folder} holds tensors the model does not have, e.g. {result.unexpected_keys[:3]}")
    _restore_aliases(model, manifest.get("tied", {}))
    still_empty = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_empty:
        raise ValueError(f"{folder} is missing tensors for {still_empty[:3]} (incomplete checkpoint?)")
    model.to(device)
    model.eval()
    return model


def _install_sparse_layer(model, files, name, format_name, dtype) -> set[str]:
    cls = get_format(format_name)
    prefix = name + "."
    keys = [prefix + k for k in (HEADER_KEY, *cls.tensor_names)]
    if prefix + HEADER_KEY not in files:
        raise ValueError(f"checkpoint lacks the sparse tensors of layer {name!r}")
    if format_of_header(files.get(prefix + HEADER_KEY), prefix + HEADER_KEY) is not cls:
        raise ValueError(f"layer {name!r} is listed as {format_name} but its header names another format")
    weight = cls.from_state_dict({k[len(prefix):]: files.get(k) for k in keys if k in files})
    if dtype is not None:
        weight = weight.to(dtype=dtype)
    bias = files.get(prefix + "bias").to(weight.dtype) if prefix + "bias" in files else None
    try:
        model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"checkpoint layer {name!r} does not exist in the model its config builds") from None
    set_submodule(model, name, SparseLinear(weight, bias))
    return set(keys) | ({prefix + "bias"} if bias is not None else set())


def _restore_aliases(model: nn.Module, aliases: dict[str, str]) -> None:
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for alias, source in aliases.items():
        module_name, _, attr = alias.rpartition(".")
        src_module_name, _, src_attr = source.rpartition(".")
        module = model.get_submodule(module_name)
        if getattr(module, attr).is_meta:
            setattr(module, attr, getattr(model.get_submodule(src_module_name), src_attr))


# --- converting a dense checkpoint without loading it whole ---------------------------------------

LazyTensors = dict[str, Callable[[], torch.Tensor]]


def _dense_tensors(folder: Path, stack: ExitStack) -> LazyTensors:
    """Every tensor of a dense checkpoint folder, each read only when its loader is called."""
    if (folder / INDEX).is_file() or (folder / SINGLE).is_file():
        files = _TensorFiles(folder, torch.device("cpu"), stack)
        return {key: (lambda k=key: files.get(k)) for key in files.keys()}
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{folder} holds no safetensors or pytorch_model*.bin weights")
    tensors: LazyTensors = {}
    for file in bins:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        tensors.update({key: (lambda k=key, s=state: s[k]) for key in state})
    return tensors


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    sparsity: float | str,
    format: str = "bitmap",
    method: str = "magnitude",
    calibration: Optional[torch.Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[str | torch.device] = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    **prune_options,
) -> Path:
    """Prune and pack a dense Hugging Face checkpoint folder without ever holding the whole model.

    ``magnitude`` streams the checkpoint tensor by tensor: peak memory is about one dense layer plus
    one output shard. ``wanda`` and ``sparsegpt`` need activations: the embeddings and one decoder
    block at a time are loaded onto `device` (CUDA when available), calibrated on `calibration`
    token ids, pruned, packed, written and freed before the next block is read (with ``owl``, each
    block is read twice: its outlier ratio first, on the dense model, then its pruning). `prune_options`
    (batch_size, blocksize, percdamp, damping, owl) go to `flashllm.prune_`. Either way a model whose
    dense weights exceed host or GPU memory can be converted.
    """
    from transformers import AutoConfig

    from .prune import METHODS, PruneSummary
    from .prune.owl import NEEDS_CALIBRATION
    from .prune.patterns import check_nm_shape, parse_sparsity

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a Hugging Face model folder (no config.json)")
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {list(METHODS)}")
    if method == "magnitude" and prune_options.get("owl"):
        raise ValueError(NEEDS_CALIBRATION)
    target = parse_sparsity(sparsity)
    check_format_name(format)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = AutoConfig.from_pretrained(str(src))
    skeleton = _empty_model(config, dtype)
    linears = {name: module for name, module in linear_layers(skeleton)}
    for name, module in linears.items():
        check_nm_shape(target, dense_weight(module).shape[1], name)
    known = set(skeleton.state_dict())
    dst.mkdir(parents=True, exist_ok=True)
    _clean_config(config).save_pretrained(dst)
    for file in _TOKENIZER_FILES:
        if (src / file).is_file() and src.resolve() != dst.resolve():
            shutil.copy2(src / file, dst / file)
    writer = _ShardWriter(dst, max_shard_bytes)
    summary = PruneSummary(method, str(target))
    packed = _Packed(format)
    started = time.perf_counter()
    with ExitStack() as stack:
        tensors = _dense_tensors(src, stack)
        unknown = sorted(set(tensors) - known)
        if unknown:
            warnings.warn(f"{src} holds tensors the model does not use, left out: {unknown[:5]}", stacklevel=2)
            tensors = {k: v for k, v in tensors.items() if k in known}
        missing = sorted(f"{name}.weight" for name in linears if f"{name}.weight" not in tensors)
        if missing:
            raise ValueError(f"{src} lacks weights for linear layers such as {missing[:3]}")
        load = _loader(tensors, dtype)
        if method == "magnitude":
            _stream_magnitude(tensors, load, linears, target, packed, writer, device, progress, summary)
        else:
            _convert_blockwise(skeleton, tensors, load, linears, target, method, calibration, packed,
                               writer, device, progress, summary, prune_options)
    writer.close()
    summary.seconds = time.perf_counter() - started
    stats = {
        "dense_linear_bytes": packed.dense_bytes,
        "compressed_linear_bytes": packed.compressed_bytes,
        "info": {"method": method, "sparsity": str(target), "source": str(src),
                 "calibration": f"{summary.calibration_samples} x {summary.calibration_seqlen} tokens"
                 if summary.calibration_tokens else None,
                 "pruned": str(summary)},
    }
    _write_manifest(dst, packed.layers, {}, stats)
    return dst


def _loader(tensors: LazyTensors, dtype: Optional[torch.dtype]):
    def load(key: str, device: Optional[torch.device] = None) -> torch.Tensor:
        tensor = tensors[key]()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor if device is None else tensor.to(device)

    return load


class _Packed:
    """The layers a conversion packed, and their bytes before and after."""

    def __init__(self, format: str):
        self.format = format  # a format's name or "auto" (chosen per layer)
        self.layers: dict[str, str] = {}
        self.dense_bytes = self.compressed_bytes = 0

    def pack(self, name: str, weight: torch.Tensor) -> SparseWeight:
        packed = format_for(self.format, weight).from_dense(weight)
        self.layers[name] = packed.name
        self.dense_bytes += packed.dense_nbytes
        self.compressed_bytes += packed.nbytes
        return packed


def _stream_magnitude(tensors, load, linears, target, packed, writer, device, progress, summary) -> None:
    from .prune.magnitude import magnitude_prune_
    from .prune.patterns import check_finite_weight

    by_weight = {f"{name}.weight": name for name in linears}
    for key in tqdm(list(tensors), desc=f"converting to {packed.format}", disable=not progress):
        if key not in by_weight:
            writer.add(key, load(key))
            continue
        name = by_weight[key]
        weight = load(key, device)
        # Conv1D (GPT-2) stores the weight transposed; formats take (out_features x in_features).
        weight = weight.t().contiguous() if is_conv1d(linears[name]) else weight.clone()
        magnitude_prune_(check_finite_weight(name, weight), target)
        summary.layers.append(name)
        summary.zeros += int((weight == 0).sum())
        summary.weights += weight.numel()
        for part, value in packed.pack(name, weight).state_dict().items():
            writer.add(f"{name}.{part}", value)
        del weight


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def _convert_blockwise(skeleton, tensors, load, linears, target, method, calibration, packed, writer,
                       device, progress, summary, prune_options) -> None:
    from .prune import calibrated_prune_
    from .prune.sequential import decoder_blocks

    blocks_name, blocks = decoder_blocks(skeleton)
    prefix = blocks_name + "."

    def block_of(key: str) -> Optional[int]:
        return int(key[len(prefix):].split(".", 1)[0]) if key.startswith(prefix) else None

    per_block: dict[int, list[str]] = {}
    outside = []
    for key in tensors:
        index = block_of(key)
        (per_block.setdefault(index, []) if index is not None else outside).append(key)
    for key in outside:
        _assign(skeleton, key, load(key, device))
    skeleton.tie_weights()
    for module in skeleton.modules():  # computed buffers (rotary frequencies) were built on the CPU
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)
    done: set[int] = set()

    def enter(i: int, block: nn.Module) -> None:
        for key in per_block.get(i, []):
            _assign(skeleton, key, load(key, device))

    def release(i: int, block: nn.Module) -> None:  # after OWL's pass: drop what `enter` read
        for key in per_block.get(i, []):
            module_name, _, attr = key.rpartition(".")
            _assign(skeleton, key, torch.empty_like(getattr(skeleton.get_submodule(module_name), attr), device="meta"))

    def leave(i: int, block: nn.Module) -> None:
        for name, module in linears.items():
            if block_of(name + ".") == i:
                weight = dense_weight(module).detach()
                bias = None if module.bias is None else module.bias.detach()
                set_submodule(skeleton, name, SparseLinear(packed.pack(name, weight), bias))
        for key, value in block.state_dict().items():
            writer.add(f"{prefix}{i}.{key}", value)
        block.to("meta")  # frees this block's memory before the next one is read
        done.add(i)

    options = {"batch_size": 8, "blocksize": 128, "percdamp": 0.01, "damping": "relative", **prune_options}
    calibrated_prune_(skeleton, list(linears.items()), target, method, calibration, summary, progress=progress,
                      enter_block=enter, leave_block=leave, release_block=release, **options)
    for i in range(len(blocks)):  # blocks after the last pruned one are copied as they are
        if i not in done:
            enter(i, blocks[i])
            leave(i, blocks[i])
    for key in outside:
        writer.add(key, load(key))
