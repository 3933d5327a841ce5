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
passes (q/k/v, o, gate/up, down, then the output), about the cost of the usual two full ones.

The blocks are found generically, as the longest `nn.ModuleList` of identical modules that hold
linear layers (Llama, Qwen2, OPT, GPT-2 and most Hugging Face decoders), and are called with the
arguments the model itself passed to the first one (attention mask, position embeddings, ...).
"""

from __future__ import annotations

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


def _calibrate_stage(
    block: nn.Module, calls: list[_BlockCall], pending: dict[nn.Module, str], make_statistic: MakeStatistic
) -> tuple[list[nn.Module], Statistic | None]:
    """Run the block over every batch up to the next stage; its layers and their shared statistic."""
    stage: list[nn.Module] = []
    statistic: Statistic | None = None
    stage_input: torch.Tensor | None = None

    def hook(module, args):
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

    handles = [module.register_forward_pre_hook(hook) for module in pending]
    try:
        for call in calls:
            stage_input = None
            try:
                call.run(block)
            except _Stop:
                pass
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
    for i in tqdm(range(last + 1), desc=desc, unit="block", disable=not progress):
        if enter_block is not None:
            enter_block(i, blocks[i])
        pending = per_block[i]
        while pending:
            stage, statistic = _calibrate_stage(blocks[i], calls, pending, make_statistic)
            if not stage:
                raise ValueError(f"{sorted(pending.values())} never ran during calibration, so they have no statistics")
            for module in stage:
                prune_layer(pending.pop(module), module, statistic)
        if i < last:
            for call in calls:
                call.hidden = call.run(blocks[i])
        if leave_block is not None:
            leave_block(i, blocks[i])
