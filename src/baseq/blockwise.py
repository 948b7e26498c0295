"""Run a decoder one block at a time: capture the inputs of the first block, then push the calibration
set through block after block. Only the block being processed (and its activations) sits on the device,
so the device memory does not grow with the depth of the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .models.families import ModelFamily


class StopForward(Exception):
    """Raised by a hook once it has what it needs from a forward pass; the caller catches it and the rest of
    the pass is not computed."""


@dataclass
class BlockInputs:
    hidden: torch.Tensor            # [num_samples, seq, hidden] on the device
    kwargs: dict[str, Any]          # what the model passes every block (rotary cos/sin, mask, ...)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def capture_block_inputs(model: nn.Module, family: ModelFamily, input_ids: torch.Tensor,
                         device: torch.device) -> BlockInputs:
    """Inputs of block 0 for each row of input_ids [n, seq]; the blocks themselves never run."""
    blocks = family.blocks(model)
    captured: dict[str, Any] = {"hidden": []}

    def catch(_module, args, kwargs):
        captured["hidden"].append(args[0] if args else kwargs["hidden_states"])
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
        raise StopForward

    for module in family.non_block_modules(model):
        module.to(device)
    home = next(blocks[0].parameters()).device
    blocks[0].to(device)
    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for row in input_ids:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        blocks[0].to(home)
    kwargs = {k: _to(v, device) for k, v in captured["kwargs"].items()}
    kwargs["use_cache"] = False
    return BlockInputs(torch.cat(captured["hidden"]).to(device), kwargs)


def block_forward(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The block's output for one micro-batch x [b, seq, d] (the captured rotary tables are for one row)."""
    kw = dict(kwargs)
    if kw.get("position_embeddings") is not None:
        cos, sin = kw["position_embeddings"]
        kw["position_embeddings"] = (cos.expand(x.shape[0], *cos.shape[1:]), sin.expand(x.shape[0], *sin.shape[1:]))
    out = block(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int = 1) -> torch.Tensor:
    """Block outputs for every sample of `hidden` [n, seq, d], in micro-batches."""
    return torch.cat([block_forward(block, hidden[start:start + batch_size], kwargs)
                      for start in range(0, hidden.shape[0], batch_size)])


def iterate_blocks(model: nn.Module, family: ModelFamily, device: torch.device) -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, block) with the block on `device`; it goes back to the host afterwards."""
    for index, block in enumerate(family.blocks(model)):
        home = next(block.parameters()).device
        block.to(device)
        try:
            yield index, block
        finally:
            block.to(home)
