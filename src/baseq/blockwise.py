"""Run a decoder one block at a time: capture the inputs of the first block, then push the calibration
set through block after block. Only the block being processed (and its activations) sits on the device,
so the device memory does not grow with the depth of the model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .models.families import ModelFamily
from .models.lazy import block_store


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
    with block_on_device(model, family, 0, device, write_back=False):
        handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for row in input_ids:
                try:
                    model(row.unsqueeze(0).to(device), use_cache=False)
                except StopForward:
                    pass
        finally:
            handle.remove()
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


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int = 1,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block outputs for every sample of `hidden` [n, seq, d], in micro-batches, each cast to `dtype` when given
    (so that 16-bit calibration activations feed an fp32 block without an fp32 copy of all of them)."""
    return torch.cat([block_forward(block, hidden[start:start + batch_size].to(dtype or hidden.dtype), kwargs)
                      for start in range(0, hidden.shape[0], batch_size)])


@contextlib.contextmanager
def block_on_device(model: nn.Module, family: ModelFamily, index: int, device: torch.device,
                    write_back: bool = True) -> Iterator[nn.Module]:
    """Block `index` on `device` for the duration. In memory it goes back where it was; in a lazy model it is
    read from its store and given back (its changes written when `write_back`), so only it is in memory."""
    block = family.blocks(model)[index]
    store = block_store(model)
    if store is None:
        home = next(block.parameters()).device
        block.to(device)
        try:
            yield block
        finally:
            block.to(home)
        return
    store.load(index, block, device)
    try:
        yield block
    finally:
        store.offload(index, block, write_back)


def iterate_blocks(model: nn.Module, family: ModelFamily, device: torch.device,
                   write_back: bool = True) -> Iterator[tuple[int, nn.Module]]:
    """Yield (index, block) with the block on `device`; it goes back afterwards (block_on_device). Passes
    that only read the blocks (evaluation) say write_back=False, so that a lazy model's store is not rewritten."""
    for index in range(len(family.blocks(model))):
        with block_on_device(model, family, index, device, write_back) as block:
            yield index, block


def move_to(model: nn.Module, family: ModelFamily, device: torch.device | str) -> None:
    """model.to(device), except that a lazy model's blocks stay with their store."""
    if block_store(model) is None:
        model.to(device)
        return
    for module in family.non_block_modules(model):
        module.to(device)
