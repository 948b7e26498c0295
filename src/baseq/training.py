"""Block-wise training: minimise the error between a quantized block's output and the full-precision
block's output over the calibration set, with AdamW (one learning rate per parameter group) and cosine
decay. Used by BASE-Q's two stages; any method that trains per block can use it.

Losses: "mse", the mean squared error of the block output (the paper's Eq. 16), and
"token_normalized_mse", each token's squared error divided by its fp output's energy, then averaged: the
plain MSE is dominated by the few tokens with a large residual norm (e.g. the first token) and by the last
blocks, whose outputs are largest."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .blockwise import block_forward, run_block
from .errors import TrainingDivergedError
from .precision import float32_matmul_precision

log = logging.getLogger("baseq")


@dataclass
class ParamGroup:
    name: str
    params: list[nn.Parameter]
    lr: float


def block_loss(kind: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out, target = out.float(), target.float()
    if kind == "mse":
        return torch.nn.functional.mse_loss(out, target)
    if kind == "token_normalized_mse":
        energy = target.pow(2).sum(dim=-1).clamp(min=1e-12)
        return ((out - target).pow(2).sum(dim=-1) / energy).mean()
    raise ValueError(f"unknown block loss {kind!r}; use mse or token_normalized_mse")


def micro_batch_loss(block: nn.Module, x: torch.Tensor, target: torch.Tensor, block_kwargs: dict,
                     loss: str) -> torch.Tensor:
    return block_loss(loss, block_forward(block, x, block_kwargs), target)


# One compiled function for every block: the block is an argument, so its parameters are graph inputs and
# blocks of the same shape share the compiled forward and backward (the transforms stage 1 trains are plain
# attributes of QuantLinear for this reason, see modules.py). Small blocks are bound by kernel launches in
# eager mode; the compiled step fuses the fake quantizers' elementwise chains. The recompile limit is raised
# so that a model whose blocks differ (or a long sweep in one process) does not fall back to eager.
_compiled_micro_batch_loss = torch.compile(micro_batch_loss, dynamic=False)
_RECOMPILE_LIMIT = 4096


def _micro_batch_loss_16bit(block, x, target, block_kwargs, loss):
    return micro_batch_loss(block, x, target, block_kwargs, loss)


# Under autocast, inductor keeps fused intermediates in fp32 where eager rounds them to 16 bit; on the CPU
# (torch 2.13) that gave NaN losses in stage 2. emulate_precision_casts rounds them as eager does (the
# losses then match the eager step's). A function of its own, so its graphs are cached apart.
_compiled_micro_batch_loss_16bit = torch.compile(_micro_batch_loss_16bit, dynamic=False,
                                                 options={"emulate_precision_casts": True})

# A compiled step that raises on its first micro-batch falls back to the eager step, for that stage and every
# later one in the process: a compiler bug must not cost a run (session 6 on the H200: inductor's TF32 backward
# of a Qwen2 block called a matmul on a buffer that had lost its 2-D view). The failed step took no optimizer
# step, so the eager retry of the same micro-batch continues exactly. Out-of-memory is not a compiler bug.
_compiled_step_error: list[str] = []

TRAIN_STEPS = ("eager", "compiled")
# the autocast dtype of each training precision (None: no autocast, the matmuls in float32)
AUTOCAST_DTYPES = {"fp32": None, "tf32": None, "fp16_autocast": torch.float16, "bf16_autocast": torch.bfloat16}
# and the float32 matmul precision of its steps: tf32 keeps every tensor in fp32 and runs the matmuls on
# TF32 tensor cores (inputs rounded to a 10-bit mantissa, fp32 accumulation; a no-op on a CPU)
MATMUL_PRECISIONS = {"tf32": "high"}


@dataclass
class TrainingLog:
    epoch_losses: list[float]   # the mean loss of each epoch, over the steps that were taken
    nonfinite_steps: int = 0    # fp16 autocast: steps with an overflowing (non-finite) loss, not applied
    compiled_step_error: str | None = None   # step="compiled" ran eager instead, because of this error


def train_block(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, block_kwargs: dict,
                groups: list[ParamGroup], epochs: int, batch_size: int, label: str, seed: int,
                loss: str = "mse", eta_min: float | None = None, final_lr_fraction: float = 0.01,
                step: str = "eager", precision: str = "fp32") -> TrainingLog:
    """The learning rates follow a cosine over all steps, down to the absolute `eta_min` shared by every
    group, or (eta_min None) to final_lr_fraction of each group's own rate. `step`: "eager", or "compiled"
    (torch.compile of forward and backward; the same numbers up to floating-point reassociation).
    `precision`: fp32; tf32 (fp32 tensors, TF32 matmuls); or fp16/bf16 autocast of the forward with the block's
    parameters kept in fp32, where fp16 goes through a GradScaler, which skips a step whose gradients overflow
    (the BASE-Q authors' code).
    Raises TrainingDivergedError (naming `label`) on a NaN/Inf epoch loss (with fp16: when no step of an
    epoch had a finite loss)."""
    if step not in TRAIN_STEPS:
        raise ValueError(f"unknown training step {step!r}; use one of {TRAIN_STEPS}")
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown training precision {precision!r}; use one of {tuple(AUTOCAST_DTYPES)}")
    autocast_dtype = AUTOCAST_DTYPES[precision]
    forward_loss = (micro_batch_loss if step == "eager" or _compiled_step_error else
                    _compiled_micro_batch_loss if autocast_dtype is None else _compiled_micro_batch_loss_16bit)
    device_type = inputs.device.type
    scaler = torch.amp.GradScaler(device_type, enabled=autocast_dtype is torch.float16)
    groups = [g for g in groups if g.params]
    if not groups or epochs <= 0:
        return TrainingLog([])
    trained = {p for g in groups for p in g.params}
    # everything else in the block is frozen while it trains: no gradient is computed or kept for it
    frozen = [p for p in block.parameters() if p.requires_grad and p not in trained]
    for p in frozen:
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    # fused: one kernel for the whole update instead of a few per parameter (CUDA only)
    optimizer = torch.optim.AdamW([{"params": g.params, "lr": g.lr} for g in groups], weight_decay=0.0,
                                  fused=device_type == "cuda")
    steps_per_epoch = math.ceil(inputs.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    if eta_min is not None:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=eta_min)
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * step / total)))

    def forward_backward(forward_loss, idx: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            value = forward_loss(block, inputs[idx].float(), targets[idx], block_kwargs, loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(value).backward()
        return value

    gen = torch.Generator().manual_seed(seed)
    epoch_losses, nonfinite_steps = [], 0
    progress = tqdm(total=total, desc=label, unit="step", leave=False)
    try:
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT,
                                        accumulated_recompile_limit=_RECOMPILE_LIMIT), \
                float32_matmul_precision(MATMUL_PRECISIONS.get(precision, "highest")):
            for epoch in range(epochs):
                order = torch.randperm(inputs.shape[0], generator=gen)
                # the loss stays on the device until the epoch ends: a host read every step would make the CPU
                # wait for the GPU, and these small steps are bound by how fast kernels are launched
                running = torch.zeros((), device=inputs.device)
                if scaler.is_enabled():   # the samples whose loss counts, and the steps whose loss did not
                    finite_samples = torch.zeros((), device=inputs.device)
                    nonfinite = torch.zeros((), device=inputs.device, dtype=torch.long)
                for start in range(0, inputs.shape[0], batch_size):
                    idx = order[start:start + batch_size].to(inputs.device)
                    try:
                        value = forward_backward(forward_loss, idx)
                    except torch.OutOfMemoryError:
                        raise
                    except Exception as error:   # noqa: BLE001 - any compiler failure; the retry re-raises real ones
                        if forward_loss is micro_batch_loss or progress.n > 0:
                            raise
                        message = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[-1][:300]}"
                        log.warning("%s: the compiled training step failed on its first micro-batch (%s); "
                                    "training with the eager step from here on (same numbers up to "
                                    "reassociation, slower)", label, message)
                        _compiled_step_error.append(message)
                        forward_loss = micro_batch_loss
                        value = forward_backward(forward_loss, idx)
                    scaler.step(optimizer)   # with the scaler off: optimizer.step()
                    scaler.update()
                    schedule.step()
                    value = value.detach()
                    if scaler.is_enabled():
                        # GradScaler skipped an overflowing step (its gradients are not finite either); it is
                        # not in the epoch's mean. (It also skips steps whose loss is finite but whose
                        # gradients overflow at its current scale; those losses are valid and counted.)
                        finite = torch.isfinite(value)
                        running += torch.where(finite, value, 0) * idx.numel()
                        finite_samples += finite * idx.numel()
                        nonfinite += ~finite
                    else:
                        running += value * idx.numel()
                    progress.update(1)
                counted = finite_samples.item() if scaler.is_enabled() else inputs.shape[0]
                mean_loss = running.item() / counted if counted else float("nan")
                if scaler.is_enabled():
                    nonfinite_steps += int(nonfinite.item())
                if not math.isfinite(mean_loss):
                    raise TrainingDivergedError(f"{label}: loss became {mean_loss} in epoch {epoch}; lower the "
                                                f"learning rates (method.lr.*) or check the block's inputs")
                epoch_losses.append(mean_loss)
                progress.set_postfix(loss=f"{epoch_losses[-1]:.3e}")
    finally:
        progress.close()
        for p in trained:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    fallback = _compiled_step_error[0] if step == "compiled" and _compiled_step_error else None
    return TrainingLog(epoch_losses, nonfinite_steps, fallback)


def mse(out: torch.Tensor, target: torch.Tensor) -> float:
    return torch.nn.functional.mse_loss(out.float(), target.float()).item()


@torch.no_grad()
def block_mse(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, block_kwargs: dict,
              batch_size: int = 1) -> float:
    return mse(run_block(block, inputs, block_kwargs, batch_size, torch.float32), targets)
