"""BASE-Q's steps (the method itself: baseq/methods/baseq/__init__.py, with its schema BaseQConfig):
QuaRot's rotations plus, per decoder block,
  stage 1: paired scales (v->o, up->down), learned R_v and activation clips, weights RTN-quantized with STE;
  fuse; GPTQ;
  stage 2: activation biases B (init: channel means), unpaired scales S^a and clips, weights frozen;
  fuse W_q B into the linear biases (Eq. 15: y = W_q Q(S^a x - B) + W_q B + b).
Each stage minimises the error between the block's full-precision output (on fp inputs) and the quantized
block's output. One block is on the device at a time. This module imports torch and the model code, so the
method's module imports it only when a run quantizes (config composition imports every method module)."""

from __future__ import annotations

import contextlib
import importlib.util
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ...blockwise import capture_block_inputs, iterate_blocks, run_block
from ...equivalence import BlockTransforms
from ...quant import ActivationQuantizer, KVQuantizer, RTNWeightQuantizer, effective_clip, learned_clip
from ...quantize import (activation_quantization_disabled, attach_quantizers, each_quantizer_input, gptq_block,
                         head_dim_of, only_quantizers, quant_linears, quantize_block_rtn)
from ...precision import float32_matmul_precision
from ...training import MATMUL_PRECISIONS, ParamGroup, block_mse, mse, train_block
from ..base import enum_value
from ..quarot import apply_rotations


def _act_quantizers(block: nn.Module) -> list[ActivationQuantizer]:
    return list(dict.fromkeys(lin.act_quantizer for lin in quant_linears(block)))


def _kv_quantizers(block: nn.Module) -> list[KVQuantizer]:
    return [m for m in block.modules() if isinstance(m, KVQuantizer)]


def _clip_parameters(block: nn.Module) -> list[nn.Parameter]:
    clips = (learned_clip(q) for q in _act_quantizers(block) + _kv_quantizers(block))
    return [c for c in clips if c is not None]


@torch.no_grad()
def input_channel_means(block: nn.Module, quantizers: list[nn.Module], hidden: torch.Tensor, block_kwargs: dict,
                        batch_size: int) -> dict[nn.Module, torch.Tensor]:
    """Mean over all calibration tokens of each quantizer's input (activation quantizers: per channel;
    KV quantizers: per head and channel), with quantization off, as BASE-Q initialises its biases."""
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def accumulate(module, x):
        if isinstance(module, KVQuantizer):  # [b, heads, seq, hd]
            total, n = x.double().sum(dim=(0, 2)), x.shape[0] * x.shape[2]
        else:
            total, n = x.double().reshape(-1, x.shape[-1]).sum(0), x[..., 0].numel()
        sums[module] = sums.get(module, 0) + total
        counts[module] = counts.get(module, 0) + n

    with each_quantizer_input(quantizers, accumulate), activation_quantization_disabled(block):
        run_block(block, hidden, block_kwargs, batch_size, torch.float32)
    return {q: (sums[q] / counts[q]).float() for q in quantizers}


def train_step(m, device: torch.device) -> str:
    """method.train_step resolved for `device`: auto compiles on CUDA where Triton is installed (inductor
    needs it there); on a CPU compiling costs more than it saves."""
    mode = enum_value(m.train_step)
    if mode != "auto":
        return mode
    return "compiled" if device.type == "cuda" and importlib.util.find_spec("triton") is not None else "eager"


def _stage1_context(block, family, m):
    """Which quantizers are on while stage 1 trains: all of them, or (the authors' code) only the down_proj
    input's, with the KV cache unquantized."""
    if enum_value(m.stage1_quantizers) == "down_proj":
        return only_quantizers(block, [block.get_submodule(family.down_proj).act_quantizer])
    return contextlib.nullcontext()


def train_stage1(block, family, m, w_bits: int, head_dim: int, inputs, targets, kwargs, label: str,
                 seed: int) -> dict:
    """Paired scales, R_v and clips against RTN-quantized weights (STE); then fuse the transforms."""
    device = inputs.device
    transforms = BlockTransforms(block, family, head_dim, m.paired_scale, m.learn_rv, m.rv_per_kv_head).to(device)
    for lin in quant_linears(block):
        lin.weight_quantizer = RTNWeightQuantizer(w_bits)
    bs = m.train_batch_size
    with _stage1_context(block, family, m):
        report = {"stage1_mse_before": block_mse(block, inputs, targets, kwargs, bs)}
        training = train_block(
            block, inputs, targets, kwargs,
            [ParamGroup("scale", transforms.scale_parameters(), m.lr.scale),
             ParamGroup("rotation", transforms.rotation_parameters(), m.lr.rotation),
             ParamGroup("clip", _clip_parameters(block), m.lr.clip)],
            m.stage1_epochs, bs, label, seed, enum_value(m.loss), m.lr.eta_min_stage1, step=train_step(m, device),
            precision=enum_value(m.train_precision))
        report.update(_training_report("stage1", training))
    for lin in quant_linears(block):
        lin.weight_quantizer = None
    report["paired_scales"] = transforms.summary()
    transforms.fuse()
    return report


def quantize_block_weights(block, family, m, q, inputs, kwargs) -> None:
    """GPTQ (or RTN) on the transformed block, activations unquantized as in GPTQ."""
    clip_search = enum_value(q.w_clip_search)
    with activation_quantization_disabled(block):
        if enum_value(m.weights) == "gptq":
            g = m.gptq
            gptq_block(block, family, inputs[:g.nsamples], kwargs, q.w_bits, clip_search, g.block_size, g.damp,
                       g.act_order, m.train_batch_size, g.normalize_tokens)
        else:
            quantize_block_rtn(block, q.w_bits, clip_search)


def train_stage2(block, m, inputs, targets, kwargs, label: str, seed: int) -> dict:
    """Activation biases (initialised from the channel means of the training inputs, or zero), unpaired
    scales and clips, with the weights frozen."""
    bs = m.train_batch_size
    act_quantizers = _act_quantizers(block)
    kv_quantizers = _kv_quantizers(block) if m.kv_bias else []
    if m.bias or m.kv_bias:
        targets_of_bias = (act_quantizers if m.bias else []) + kv_quantizers
        means = input_channel_means(block, targets_of_bias, inputs, kwargs, bs)
        for quantizer in targets_of_bias:
            quantizer.add_bias(means[quantizer] if m.bias_init == "mean" else torch.zeros_like(means[quantizer]))
    if m.unpaired_scale:
        for quantizer in act_quantizers:
            quantizer.add_scale()
    biases = [qz.bias for qz in act_quantizers + kv_quantizers if qz.bias is not None]
    scales = [qz.scale for qz in act_quantizers if qz.scale is not None]
    report = {"stage2_mse_before": block_mse(block, inputs, targets, kwargs, bs)}
    training = train_block(
        block, inputs, targets, kwargs,
        [ParamGroup("bias", biases, m.lr.bias), ParamGroup("scale", scales, m.lr.scale),
         ParamGroup("clip", _clip_parameters(block), m.lr.clip)],
        m.stage2_epochs, bs, label, seed, enum_value(m.loss), m.lr.eta_min_stage2,
        step=train_step(m, inputs.device), precision=enum_value(m.train_precision))
    report.update(_training_report("stage2", training))
    return report


def _training_report(stage: str, training) -> dict:
    """The epoch losses, (fp16 autocast) how many steps had a non-finite loss and were skipped, and (a compiled
    step that failed) the error that made the stage train eagerly, if any."""
    report = {f"{stage}_loss": training.epoch_losses}
    if training.nonfinite_steps:
        report[f"{stage}_nonfinite_steps"] = training.nonfinite_steps
    if training.compiled_step_error:
        report[f"{stage}_compiled_step_error"] = training.compiled_step_error
    return report


@torch.no_grad()
def learned_summary(block: nn.Module, family) -> dict:
    """What training left in a block's quantizers: clip ratios (per KV head where learned so), bias norms and
    unpaired-scale ranges, one entry per quantizer (named by the first linear that reads it)."""
    summary = {}
    for group in family.sequential_groups():
        quantizer = block.get_submodule(group[0]).act_quantizer
        entry = {"clip": effective_clip(quantizer, torch.float32).item()}
        if quantizer.bias is not None:
            entry["bias_norm"] = quantizer.bias.norm().item()
        if quantizer.scale is not None:
            s = quantizer.scale
            entry["scale_min"], entry["scale_max"], entry["scale_mean"] = s.min().item(), s.max().item(), s.mean().item()
        summary[group[0].rsplit(".", 1)[-1]] = entry
    attention = block.get_submodule(family.attention).attention_quantizer
    for name, quantizer in (("k_cache", attention.k_quantizer), ("v_cache", attention.v_quantizer)):
        summary[name] = {"clip": effective_clip(quantizer, torch.float32).flatten().tolist()}
    return summary


def quantize(model, family, ctx) -> None:
    m, q = ctx.method, ctx.quant
    device, bs = ctx.device, m.train_batch_size
    seconds = ctx.report.setdefault("timings_s", {"rotations": 0.0, "capture_inputs": 0.0, "stage1": 0.0,
                                                  "gptq": 0.0, "stage2": 0.0})

    def now() -> float:   # stage times must not depend on where the GPU's queue happens to be
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    start = now()
    attach_quantizers(model, family, q.a_bits, q.kv_bits, m.act_clip_ratio, m.kv_clip_ratio, learn_clip=m.learn_clip,
                      kv_clip_per_head=m.kv_clip_per_head)
    apply_rotations(model, family, device, ctx.seed, enum_value(m.residual_rotation), enum_value(m.o_proj_hadamard),
                    value_rotation=enum_value(m.rv_init) == "hadamard", note=ctx.note)
    seconds["rotations"] += now() - start
    head_dim = head_dim_of(model.config)
    train_inputs, gptq_inputs = enum_value(m.train_inputs), enum_value(m.gptq_inputs)
    stage1 = (m.paired_scale or m.learn_rv or m.learn_clip) and m.stage1_epochs > 0
    stage2 = (m.bias or m.unpaired_scale or m.learn_clip or m.kv_bias) and m.stage2_epochs > 0

    start = now()
    inputs = capture_block_inputs(model, family, ctx.calibration, device)
    seconds["capture_inputs"] += now() - start
    x_fp, x_q, kwargs = inputs.hidden, inputs.hidden.clone(), inputs.kwargs
    del inputs   # else block 0's inputs would stay on the device for the whole loop, once x_fp moves on
    n_train = x_fp.shape[0] - m.heldout_samples
    train, held = slice(0, n_train), slice(n_train, None)
    report = ctx.report.setdefault("blocks", [])
    dtype = next(model.parameters()).dtype
    blocks = family.blocks(model)
    # train_precision=tf32 puts every matmul of the block's passes on TF32: training, its targets, the
    # diagnostics, the next block's inputs and the forwards that feed GPTQ's Hessians (six no-grad passes over
    # the calibration set plus about two in GPTQ; by FLOP count about 9 s each at fp32's rate on a 70B-shaped
    # block, whose whole step took 181 s). The Hessians and GPTQ's solve stay in fp32 (gptq.py).
    passes = MATMUL_PRECISIONS.get(enum_value(m.train_precision), "highest")
    last = now()
    for index, block in tqdm(iterate_blocks(model, family, device), total=len(blocks), desc="BASE-Q", unit="block"):
        with float32_matmul_precision(passes):
            # per block: the time to bring it in (the previous block written back, this one read: a lazy model's
            # disk traffic) and to capture its fp targets, its two stages and GPTQ, and the rest (final errors,
            # next inputs)
            block_seconds = {"move": now() - last}
            start = now()
            block.float()
            # x_fp and x_q stay in the load dtype: every consumer casts a micro-batch at a time to the fp32 block
            with activation_quantization_disabled(block), torch.no_grad():
                y_fp = run_block(block, x_fp, kwargs, bs, torch.float32)
            train_x = (x_fp if train_inputs == "fp" else x_q)[train]
            entry = {"block": index}
            block_seconds["fp_targets"] = now() - start

            start = now()
            if stage1:
                entry.update(train_stage1(block, family, m, q.w_bits, head_dim, train_x, y_fp[train], kwargs,
                                          f"block {index} stage 1", ctx.seed + index))
            block_seconds["stage1"] = now() - start

            start = now()
            quantize_block_weights(block, family, m, q, (x_fp if gptq_inputs == "fp" else x_q)[train], kwargs)
            block_seconds["gptq"] = now() - start

            start = now()
            if stage2:
                entry.update(train_stage2(block, m, train_x, y_fp[train], kwargs, f"block {index} stage 2",
                                          ctx.seed + 7919 + index))
            for lin in quant_linears(block):
                lin.fuse_activation_bias()
            block_seconds["stage2"] = now() - start
            for stage in ("stage1", "gptq", "stage2"):
                seconds[stage] += block_seconds[stage]
            start = now()

            # the block's error on fp inputs (its own share) and on the quantized model's inputs (what evaluation
            # sees: it includes every earlier block's error), against the fp block on fp inputs
            entry["final_mse_fp_inputs"] = block_mse(block, x_fp[train], y_fp[train], kwargs, bs)
            if m.heldout_samples:
                entry["heldout_mse_fp_inputs"] = block_mse(block, x_fp[held], y_fp[held], kwargs, bs)
            # the quantized model's next inputs; their error is the block's MSE on the quantized inputs
            with torch.no_grad():
                y_q = run_block(block, x_q, kwargs, bs, torch.float32)
            entry["final_mse_quantized_inputs"] = mse(y_q[train], y_fp[train])
            if m.heldout_samples:
                entry["heldout_mse_quantized_inputs"] = mse(y_q[held], y_fp[held])
            entry["learned"] = learned_summary(block, family)
            x_q = y_q.to(x_q.dtype)
            x_fp = y_fp.to(x_fp.dtype)
            block.to(dtype)
            block_seconds["rest"] = now() - start
            entry["seconds"] = block_seconds
            report.append(entry)
        last = now()
