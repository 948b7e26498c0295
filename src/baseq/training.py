"""Block-wise training: minimise the MSE between a quantized block's output and the full-precision
block's output over the calibration set, with AdamW (one learning rate per parameter group) and cosine
decay. Used by BASE-Q's two stages; any method that trains per block can use it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .blockwise import run_block
from .errors import TrainingDivergedError


@dataclass
class ParamGroup:
    name: str
    params: list[nn.Parameter]
    lr: float


def train_block(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, block_kwargs: dict,
                groups: list[ParamGroup], epochs: int, batch_size: int, label: str, seed: int,
                final_lr_fraction: float = 0.01) -> list[float]:
    """Returns the mean loss of each epoch. Raises TrainingDivergedError (naming `label`) on a NaN/Inf loss."""
    groups = [g for g in groups if g.params]
    if not groups or epochs <= 0:
        return []
    for g in groups:
        for p in g.params:
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": g.params, "lr": g.lr} for g in groups], weight_decay=0.0)
    steps_per_epoch = math.ceil(inputs.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * step / total)))
    gen = torch.Generator().manual_seed(seed)
    epoch_losses = []
    progress = tqdm(total=total, desc=label, unit="step", leave=False)
    try:
        for epoch in range(epochs):
            order = torch.randperm(inputs.shape[0], generator=gen)
            running = 0.0
            for start in range(0, inputs.shape[0], batch_size):
                idx = order[start:start + batch_size].to(inputs.device)
                out = run_block(block, inputs[idx].float(), block_kwargs, batch_size)
                loss = torch.nn.functional.mse_loss(out.float(), targets[idx].float())
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"{label}: loss became {loss.item()} at epoch {epoch}; lower the "
                                                f"learning rates (method.lr.*) or check the block's inputs")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                running += loss.item() * idx.numel()
                progress.update(1)
            epoch_losses.append(running / inputs.shape[0])
            progress.set_postfix(loss=f"{epoch_losses[-1]:.3e}")
    finally:
        progress.close()
        for g in groups:
            for p in g.params:
                p.requires_grad_(False)
    return epoch_losses


@torch.no_grad()
def block_mse(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, block_kwargs: dict,
              batch_size: int = 1) -> float:
    out = run_block(block, inputs.float(), block_kwargs, batch_size)
    return torch.nn.functional.mse_loss(out.float(), targets.float()).item()
