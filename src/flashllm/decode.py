"""Greedy (or sampled) decoding with a static KV cache, replayed as a CUDA graph on the GPU.

Hugging Face's eager `generate` spends most of a decode step in Python and kernel launches (on an
H200, 22 ms per Llama-2-7B step where the weights stream in 3 ms), so faster kernels would not
show. Here the decode step has fixed shapes (one token per sequence, a preallocated cache) and is
captured once as a CUDA graph; each new token is one graph replay. Dense and sparse models run the
same code, so their times compare only the linear layers. On the CPU (or where capture fails) the
same step runs eagerly, which is what the tests check against `generate`.

A graph removes the host's launch overhead but not the GPU's: a Llama decode step is hundreds of
small kernels besides its linear layers (norms, rotary embeddings, residual adds, the cache
update), and on an H200 the dense Llama-2-7B step took 7.0 ms where its linear weights stream in
about 3 ms (BENCHMARKS.md). That time is the same for dense and sparse, so it dilutes every kernel
speedup. ``compiled=True`` runs the decode step through `torch.compile` (fixed shapes; the sparse
layers' custom op stays opaque to it), which fuses those small kernels, before the graph captures
it; prefill stays eager (its length varies). The first step then compiles (tens of seconds).
"""

from __future__ import annotations

import inspect
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .sampling import Sampling, next_tokens


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # (batch, prompt + new)
    prefill_seconds: float  # time to first token
    decode_seconds: float  # the remaining new tokens
    new_tokens: int
    cuda_graph: bool
    notes: list[str] = field(default_factory=list)
    compiled: bool = False  # the decode step ran through torch.compile

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second over the whole batch, decode steps only (the first token excluded)."""
        steps = self.new_tokens - 1
        return self.tokens.shape[0] * steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def _cache_keyword(model: nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` in 5.2x; support both.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _logits_fn(model: nn.Module, cache, cache_kw: str,
               attention_mask: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The decode step's forward: the next-token logits of `ids` at `positions`, `cache` updated.

    `attention_mask` is all ones over the cache's length. Without one, OPT builds its own from the
    cache's length, a device tensor in a static cache, read back to the host (`.item()`) every step:
    a CUDA graph cannot capture that (OPT-30B on an H200, thirteenth session)."""
    def forward(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = model(ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **{cache_kw: cache})
        return out.logits[:, -1]
    return forward


class HostSyncs(TorchDispatchMode):
    """Records the ops run inside it that make the host wait for the device (a tensor read back as a
    Python number, `nonzero`, indexing by a boolean mask), each with the innermost caller outside
    torch. A CUDA graph capture
    fails on them, and a failed capture left torch's CUDA generator unusable for the rest of the
    process (the next `torch.randint` raised), so the decoder looks for them before capturing."""

    # Ops whose result (a number, or an output's size) the host must read before going on.
    SYNCING = tuple(getattr(torch.ops.aten, op).default for op in (
        "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2",
        "unique_consecutive", "unique_dim")) + (torch.ops.aten.repeat_interleave.Tensor,)
    INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default)

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def _waits(self, func, args) -> bool:
        if func in self.SYNCING:
            return True
        # Indexing by a boolean mask: the output's size is the mask's count of True.
        return func in self.INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._waits(func, args):
            torch_dir = os.path.dirname(torch.__file__)
            callers = [f for f in traceback.extract_stack() if not f.filename.startswith(torch_dir)]
            where = f" at {os.path.basename(callers[-2].filename)}:{callers[-2].lineno}" if len(callers) > 1 else ""
            self.found.append(f"{func}{where}")
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StaticDecoder:
    """Decoding of `batch_size` sequences of at most `max_length` tokens (prompt included): greedy,
    or with `sampling` (`flashllm.sampling`) drawn from each step's filtered softmax, in the graph
    too (seed it with `torch.manual_seed` before `generate` for a repeatable run).

    Every sequence gets exactly `max_new_tokens` new tokens unless `generate` is given stop tokens,
    so a throughput measurement always times the same work (`flashllm.generate.generate_text`
    passes the end-of-sequence token)."""

    def __init__(self, model: nn.Module, batch_size: int, max_length: int, cuda_graph: bool = True,
                 compiled: bool = False, sampling: Optional[Sampling] = None):
        from transformers import StaticCache

        self.model = model
        self.device = next(model.parameters()).device
        self.batch_size, self.max_length = batch_size, max_length
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        self.cache_kw = _cache_keyword(model)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.attention_mask = torch.ones(batch_size, max_length, dtype=torch.long, device=self.device)
        self.graph = None
        self.notes: list[str] = []
        self.compiled = compiled
        self.sampling = sampling  # None: greedy
        # A closure over the model and the cache, not a bound method: the decoder holding a bound
        # method of itself is a reference cycle, which kept a finished decoder's model (and its GPU
        # memory) alive until Python's cycle collector ran; a benchmark building the next model
        # measured both (BENCHMARKS.md, eleventh session).
        self._forward = _logits_fn(model, self.cache, self.cache_kw, self.attention_mask)
        self._decode = torch.compile(self._forward, dynamic=False) if compiled else self._forward
        if cuda_graph and self.device.type == "cuda":
            self._capture()

    @torch.no_grad()
    def _step(self) -> None:
        self.token.copy_(next_tokens(self._decode(self.token, self.position), self.sampling))
        self.position.add_(1)

    def _reset(self) -> None:
        self.cache.reset()
        self.position.zero_()

    @torch.no_grad()
    def host_syncs(self) -> list[str]:
        """The host syncs in one eager decode step (it advances the cache: reset it after)."""
        with HostSyncs() as mode:
            next_tokens(self._forward(self.token, self.position), self.sampling)
        return sorted(set(mode.found))

    def _capture(self) -> None:
        try:
            # The cache allocates its tensors at first use (and a compiled step compiles); warm up
            # on a side stream so the capture sees allocated buffers, then reset them in place
            # (addresses unchanged).
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._step()
                syncs = self.host_syncs()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._reset()
            if syncs:
                self.notes.append(f"CUDA graph not captured: the decode step waits for the GPU ({', '.join(syncs)}); "
                                  "decoding eagerly")
                warnings.warn(self.notes[-1], stacklevel=3)
                return
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            self._reset()
            self.graph = graph
        except Exception as err:  # capture is an optimization: fall back, and say so
            self.graph = None
            self._reset()
            note = f"CUDA graph capture failed ({type(err).__name__}: {err}); decoding eagerly"
            self.notes.append(note)
            warnings.warn(note, stacklevel=3)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, stop_token_ids: Sequence[int] = (),
                 check_every: int = 8) -> DecodeResult:
        """Greedy (or, with `sampling`, sampled) decoding of `max_new_tokens` per sequence, or fewer
        with `stop_token_ids`: once
        every sequence has produced one of them, decoding ends at the next check (one host sync
        every `check_every` steps, so at most that many steps run past the last stop token; their
        tokens are in `tokens`, which then ends at the last step run)."""
        batch, prompt = input_ids.shape
        if check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {check_every}")
        if batch != self.batch_size:
            raise ValueError(f"this decoder was built for batch {self.batch_size}, got {batch}")
        if max_new_tokens < 1 or prompt + max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) must fit max_length {self.max_length}"
            )
        self._reset()
        out = torch.empty(batch, prompt + max_new_tokens, dtype=torch.long, device=self.device)
        out[:, :prompt] = input_ids
        _sync(self.device)
        start = time.perf_counter()
        positions = torch.arange(prompt, device=self.device).unsqueeze(0)
        self.token.copy_(next_tokens(self._forward(input_ids.to(self.device), positions), self.sampling))
        self.position.fill_(prompt)
        out[:, prompt] = self.token[:, 0]
        _sync(self.device)
        first = time.perf_counter()
        stops = torch.tensor(list(stop_token_ids), dtype=torch.long, device=self.device)
        stopped = torch.isin(self.token[:, 0], stops) if len(stops) else None
        steps = max_new_tokens
        for i in range(1, max_new_tokens):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            out[:, prompt + i] = self.token[:, 0]
            if stopped is not None:
                stopped |= torch.isin(self.token[:, 0], stops)
                if i % check_every == 0 and bool(stopped.all()):
                    steps = i + 1
                    break
        _sync(self.device)
        end = time.perf_counter()
        return DecodeResult(out[:, : prompt + steps], first - start, end - first, steps, self.graph is not None,
                            list(self.notes), self.compiled)
