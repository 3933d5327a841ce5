"""Calibration through a decoder, one block at a time, each fed by the already-pruned blocks before it.

Running the whole model on all calibration tokens would keep every layer's activations; instead the
inputs of the first decoder block are captured (the forward stops there), and each block in turn is
calibrated, pruned and run to produce the inputs of the next. Memory stays near one block's
activations plus the hidden states of the calibration tokens, and each layer's statistics come from
the inputs the pruned model will actually feed it, so the layers after a pruned one learn to
compensate its error instead of compounding it.

Inside a block, the layers are pruned in stages, in the order the forward reaches them: a stage is
the layers that read one same input tensor (q/k/v, gate/up), whose statistics are computed once.
A calibration pass runs the block until it reaches a not-yet-pruned layer fed by a different input,
then stops; that stage is pruned, and the next pass sees its pruned outputs. A Llama block takes five
passes (q/k/v, o, gate/up, down, then the output), and three things keep that cheap. What an earlier
stage pruned would compute the same output again in every later pass (everything before it is
fixed by then), so those outputs are kept per batch and reused (`_PrunedOutputs`; whole attention
or MLP modules once all their layers are pruned). A stage's own layers need only their input in
their pass, so they skip their product and return zeros. And once the first batch has shown which
layers make up a stage, later batches stop as soon as the last of them has its input. Each linear
layer then computes its output once per batch, as a single forward of the pruned model would, and
the pruned weights are the same to the bit as when every pass runs in full.

The blocks are found generically, as the longest `nn.ModuleList` of identical modules that hold
linear layers (Llama, Qwen2, OPT, GPT-2 and most Hugging Face decoders), and are called with the
arguments the model itself passed to the first one (attention mask, position embeddings, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import is_linear


class Statistic(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


MakeStatistic = Callable[[int, torch.device], Statistic]
PruneLayer = Callable[[str, nn.Module, Statistic], None]
# Called with (index, block) before a block is calibrated and after its outputs are computed: lets
# a caller keep only one block's weights in memory (see `flashllm.checkpoint.convert_checkpoint`).
BlockHook = Callable[[int, nn.Module], None]


class _Stop(Exception):
    """Raised from a hook to end a forward pass early, once it has produced what we need."""


@dataclass
class _BlockCall:
    """The arguments of one batch's call to a decoder block, with replaceable hidden states."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]

    def run(self, block: nn.Module) -> torch.Tensor:
        if "hidden_states" in self.kwargs:
            out = block(*self.args, **{**self.kwargs, "hidden_states": self.hidden})
        else:
            out = block(self.hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class _PrunedOutputs:
    """The outputs of a block's already-pruned parts, per batch, reused by later passes.

    A part is a pruned linear layer, or a submodule (attention, MLP) whose layers to prune are all
    pruned. Layers are pruned in the order the forward reaches them, so by then every layer that
    runs before such a part is pruned too: its inputs and weights are fixed, and a reused output is
    exactly the one it would compute. Each call of a part within one batch's pass has its own entry
    (a part called twice per forward stays correct), an output that something modified in place is
    computed again, and past `budget` bytes parts simply compute.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.nbytes = 0
        self.batch = 0
        self.outputs: dict[tuple[int, int, int], tuple[Any, list[int]]] = {}
        self.calls: dict[int, int] = {}
        self.wrapped: list[tuple[nn.Module, Optional[Callable]]] = []
        self.pending_inside: dict[nn.Module, set[nn.Module]] = {}
        self.keeping = True

    def enter(self, block: nn.Module, pending: dict[nn.Module, str]) -> None:
        """Start a block whose layers `pending` are about to be pruned."""
        for module in block.modules():
            inside = {m for m in module.modules() if m in pending}
            if module is not block and inside and module not in pending:
                self.pending_inside[module] = inside

    def start(self, batch: int) -> None:
        """Called before each batch's pass through the block."""
        self.batch = batch
        self.calls.clear()
        self.keeping = True

    def stop_keeping(self) -> None:
        """The rest of this pass computes on stand-in values (see `_calibrate_stage`): keep none of it."""
        self.keeping = False

    def pruned(self, layer: nn.Module, still_pending: dict[nn.Module, str]) -> None:
        """`layer` was just pruned: it, and every submodule left with nothing to prune, now reuse."""
        self._wrap(layer)
        for module, inside in list(self.pending_inside.items()):
            if not any(m in still_pending for m in inside):
                del self.pending_inside[module]
                self._wrap(module)

    def _wrap(self, module: nn.Module) -> None:
        original = module.forward
        # An instance-level forward (accelerate's hooks install one) is put back by `clear`.
        self.wrapped.append((module, module.__dict__.get("forward")))

        def forward(*args, **kwargs):
            call = self.calls.get(id(module), 0)
            self.calls[id(module)] = call + 1
            key = (id(module), self.batch, call)
            kept = self.outputs.pop(key, None)
            if kept is not None:
                if _versions(kept[0]) == kept[1]:
                    self.outputs[key] = kept
                    return kept[0]
                self.nbytes -= _nbytes(kept[0])  # modified in place since: compute it again
            out = original(*args, **kwargs)
            versions = _versions(out)
            size = _nbytes(out)
            if self.keeping and versions is not None and self.nbytes + size <= self.budget:
                self.outputs[key] = (out, versions)
                self.nbytes += size
            return out

        module.forward = forward

    def clear(self) -> None:
        """Forget the outputs and give the parts their own forward back (end of a block)."""
        for module, previous in reversed(self.wrapped):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self.wrapped.clear()
        self.outputs.clear()
        self.pending_inside.clear()
        self.nbytes = 0


def _versions(out: Any) -> Optional[list[int]]:
    """In-place version counters of a tensor or a tuple of tensors and Nones; None for anything else
    (such an output is not kept)."""
    if isinstance(out, torch.Tensor):
        return [out._version]
    if isinstance(out, tuple) and all(t is None or isinstance(t, torch.Tensor) for t in out):
        return [-1 if t is None else t._version for t in out]
    return None


def _nbytes(out: Any) -> int:
    tensors = out if isinstance(out, tuple) else (out,)
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def output_cache_budget(device: torch.device) -> int:
    """Bytes of pruned-layer outputs a block may keep: a quarter of the free memory of `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):  # not Linux: a fixed, modest budget
        return 1 << 30


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, blocks) of the model's stack of decoder blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"found no stack of decoder blocks in {type(model).__name__} (an nn.ModuleList of "
            "identical modules holding linear layers); calibrated pruning needs one"
        )
    return best


def _capture_inputs(model: nn.Module, first: nn.Module, calibration: torch.Tensor, batch_size: int) -> list[_BlockCall]:
    calls: list[_BlockCall] = []

    def hook(module, args, kwargs):
        if args:
            calls.append(_BlockCall(args[0], args[1:], dict(kwargs)))
        else:
            calls.append(_BlockCall(kwargs["hidden_states"], (), dict(kwargs)))
        raise _Stop

    device = next(model.parameters()).device
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                continue
            raise RuntimeError(f"the forward of {type(model).__name__} never reached its first decoder block")
    finally:
        handle.remove()
    return calls


# Tests switch this off to check that the stand-in outputs change nothing.
STAND_IN_STAGE_OUTPUTS = True


def _calibrate_stage(
    block: nn.Module, calls: list[_BlockCall], pending: dict[nn.Module, str], make_statistic: MakeStatistic,
    reuse: _PrunedOutputs,
) -> tuple[list[nn.Module], Statistic | None]:
    """Run the block over every batch up to the next stage; its layers and their shared statistic.

    The stage's layers compute nothing: by the time one runs, the stage's input exists, and the pass
    only goes on to find the stage's other layers (which read that same tensor) and the layer that
    ends it. So each multiplies one row, to learn its output's width and dtype, and returns zeros;
    what the block computes after that is never used, and `reuse` keeps none of it. (Which layers a
    pass reaches could in principle depend on those values; no decoder we know branches that way,
    and the tests compare against full outputs on Llama, Qwen2, Qwen3, Phi-3, OPT, GPT-2,
    GPT-NeoX and Qwen2-MoE.)
    """
    stage: list[nn.Module] = []
    statistic: Statistic | None = None
    stage_input: torch.Tensor | None = None
    seen: set[nn.Module] = set()
    known = False  # the first batch found the stage; later ones stop once all of it has its input
    stand_in: dict[nn.Module, torch.Size] = {}  # stage layers running on one row: their full output shape

    def before(module, args):
        nonlocal statistic, stage_input
        x = args[0]
        if stage_input is None:
            stage_input = x
            if statistic is None:
                statistic = make_statistic(x.shape[-1], x.device)
            statistic.add(x)
        elif x is not stage_input:
            raise _Stop
        if module not in stage:
            stage.append(module)
        seen.add(module)
        if known and len(seen) == len(stage):
            raise _Stop
        if not STAND_IN_STAGE_OUTPUTS or not is_linear(module):
            return None
        reuse.stop_keeping()
        stand_in[module] = x.shape[:-1]
        return (x.reshape(-1, x.shape[-1])[:1], *args[1:])

    def after(module, args, out):
        shape = stand_in.pop(module, None)
        return None if shape is None else out.new_zeros(*shape, out.shape[-1])

    handles = [module.register_forward_pre_hook(before) for module in pending]
    handles += [module.register_forward_hook(after) for module in pending]
    try:
        for index, call in enumerate(calls):
            stage_input = None
            seen.clear()
            reuse.start(index)
            try:
                call.run(block)
            except _Stop:
                pass
            known = bool(stage)
    finally:
        for handle in handles:
            handle.remove()
    return stage, statistic


@torch.no_grad()
def prune_sequentially(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    calibration: torch.Tensor,
    make_statistic: MakeStatistic,
    prune_layer: PruneLayer,
    batch_size: int,
    progress: bool,
    desc: str,
    enter_block: Optional[BlockHook] = None,
    leave_block: Optional[BlockHook] = None,
) -> None:
    """Prune ``layers`` block by block, each from statistics of its inputs in the pruned model."""
    blocks_name, blocks = decoder_blocks(model)
    block_of = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    outside = [name for name, module in layers if id(module) not in block_of]
    if outside:
        raise ValueError(
            f"{outside} lie outside the decoder blocks ({blocks_name!r}), where calibration statistics "
            "are gathered; exclude them with filter_fn or prune them with method='magnitude'"
        )
    per_block: list[dict[nn.Module, str]] = [{} for _ in blocks]
    for name, module in layers:
        per_block[block_of[id(module)]][module] = name
    last = max(i for i, chosen in enumerate(per_block) if chosen)

    calls = _capture_inputs(model, blocks[0], calibration, batch_size)
    reuse = _PrunedOutputs(output_cache_budget(calls[0].hidden.device))
    for i in tqdm(range(last + 1), desc=desc, unit="block", disable=not progress):
        if enter_block is not None:
            enter_block(i, blocks[i])
        pending = per_block[i]
        reuse.enter(blocks[i], pending)
        try:
            while pending:
                stage, statistic = _calibrate_stage(blocks[i], calls, pending, make_statistic, reuse)
                if not stage:
                    raise ValueError(f"{sorted(pending.values())} never ran during calibration, so they have no statistics")
                for module in stage:
                    prune_layer(pending.pop(module), module, statistic)
                    reuse.pruned(module, pending)
            if i < last:
                for index, call in enumerate(calls):
                    reuse.start(index)
                    call.hidden = call.run(blocks[i])
        finally:
            reuse.clear()
        if leave_block is not None:
            leave_block(i, blocks[i])
