"""Text generation, timed: time to first token, tokens/s, memory.

Decoding on a GPU, greedy or sampled, runs `flashllm.decode.StaticDecoder` (a static KV cache,
each step one CUDA-graph replay), so its tokens/s reflect the model's kernels rather than Python:
Hugging Face's eager `generate` spends most of a step launching kernels (BENCHMARKS.md). The CPU
uses `generate`. Both give the same greedy tokens (tests/test_generate.py); sampled, each draws
from the same filtered distribution but not the same numbers.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .nn import SparseLinear
from .sampling import Sampling


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float
    weight_bytes: int
    peak_memory_bytes: int
    memory_kind: str  # "GPU allocated" or "process RSS"

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time after the first."""
        steps = self.new_tokens - 1
        rest = self.seconds - self.first_token_seconds
        return steps / rest if steps > 0 and rest > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.seconds:.2f} s: {self.tokens_per_second:.1f} tokens/s, "
            f"first token after {self.first_token_seconds * 1000:.0f} ms; weights {self.weight_bytes / 2**20:.1f} MiB, "
            f"peak {self.memory_kind} {self.peak_memory_bytes / 2**20:.0f} MiB"
        )


class _StepClock:
    """A logits processor that only timestamps: generate calls it once per new token."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers, compressed layers counted as stored."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if name in getattr(module, "_non_persistent_buffers_set", ()) or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_prompt(tokenizer, prompt: str, chat: Optional[bool] = None) -> tuple[str, bool]:
    """The prompt, wrapped in the model's chat template when it has one (instruct models) unless
    `chat` is False; and whether it was wrapped."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("chat=True, but the tokenizer has no chat template")
    if chat is None:
        chat = has_template
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text, True
    return prompt, False


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: Optional[int] = None,
    seed: int = 0,
    chat: Optional[bool] = None,
    static: Optional[bool] = None,
) -> GenerationResult:
    """`prompt` continued by `model`. `static` picks the static-cache decoder (CUDA graphs on a
    GPU, greedy or sampled); by default it runs on a GPU, Hugging Face `generate` otherwise.
    Sampling takes `temperature`, `top_p` and `top_k` (None: the model's generation config's, as
    `generate` would), the same on both paths."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    if static is None:
        static = device.type == "cuda"
    if top_k is None:
        top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
    # Checked on either path; top_k 0 is off, as in `generate`.
    sampling = Sampling(temperature, top_p, top_k or None) if do_sample else None
    text, templated = build_prompt(tokenizer, prompt, chat)
    # A chat template already holds the special tokens.
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not templated).to(device)
    if static:
        return _generate_static(model, tokenizer, inputs.input_ids, max_new_tokens, device, sampling, seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    clock = _StepClock(device)
    how = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample
           else {"do_sample": False})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, logits_processor=[clock], pad_token_id=pad, **how
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    new = out[0, inputs.input_ids.shape[1]:]
    peak, memory_kind = _peak_memory(device)
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=inputs.input_ids.shape[1],
        new_tokens=int(new.numel()),
        seconds=end - start,
        first_token_seconds=(clock.times[0] - start) if clock.times else end - start,
        weight_bytes=weight_bytes(model),
        peak_memory_bytes=peak,
        memory_kind=memory_kind,
    )


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """The peak memory since the last reset, and what it counts."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU allocated"
    return _peak_rss_bytes(), "process RSS"


def _stop_ids(model: nn.Module, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _generate_static(model: nn.Module, tokenizer, input_ids: torch.Tensor, max_new_tokens: int,
                     device: torch.device, sampling: Optional[Sampling], seed: int) -> GenerationResult:
    from .decode import StaticDecoder

    prompt = input_ids.shape[1]
    # Built, its step captured as a graph, before the clock starts: the times are the prefill and
    # the decoding, as they are for `generate` (whose per-call setup is small).
    decoder = StaticDecoder(model, 1, prompt + max_new_tokens, sampling=sampling)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)  # after the capture's warm-up steps, which draw too
    stops = _stop_ids(model, tokenizer)
    result = decoder.generate(input_ids, max_new_tokens, stop_token_ids=stops)
    new = result.tokens[0, prompt:]
    # What `generate` returns: up to and including the first stop token.
    hits = torch.isin(new, torch.tensor(stops, device=new.device)).nonzero() if stops else []
    count = int(hits[0]) + 1 if len(hits) else new.numel()
    peak, memory_kind = _peak_memory(device)
    # Steps past the stop token (at most the decoder's check interval) are timed but not counted:
    # the reported tokens/s errs low, never high.
    return GenerationResult(
        text=tokenizer.decode(new[:count], skip_special_tokens=True),
        prompt_tokens=prompt,
        new_tokens=count,
        seconds=result.prefill_seconds + result.decode_seconds,
        first_token_seconds=result.prefill_seconds,
        weight_bytes=weight_bytes(model),
        peak_memory_bytes=peak,
        memory_kind=memory_kind,
    )


def sparse_layer_count(model: nn.Module) -> int:
    return sum(isinstance(m, SparseLinear) for m in model.modules())
