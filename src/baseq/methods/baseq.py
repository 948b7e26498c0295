"""BASE-Q (He et al., 2025): QuaRot's rotations plus, per decoder block,
  stage 1: paired scales (v->o, up->down), learned R_v and activation clips, weights RTN-quantized with STE;
  fuse; GPTQ;
  stage 2: activation biases B (init: channel means), unpaired scales S^a and clips, weights frozen;
  fuse W_q B into the linear biases.
Each stage minimises the MSE between the block's full-precision and quantized outputs. One block is on
the device at a time. Every component is a switch of the method config (see BaseQConfig), so the paper's
ablation ladder is a set of configs (conf/method/baseq_ablation/)."""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..blockwise import capture_block_inputs, iterate_blocks, run_block
from ..config import enum_value
from ..equivalence import BlockTransforms
from ..quant import ActivationQuantizer, KVQuantizer, RTNWeightQuantizer
from ..quantize import (activation_quantization_disabled, attach_quantizers, each_quantizer_input, gptq_block,
                        quant_linears, quantize_block_rtn)
from ..training import ParamGroup, block_mse, train_block
from .quarot import apply_rotations, head_dim_of


def _act_quantizers(block: nn.Module) -> list[ActivationQuantizer]:
    return list(dict.fromkeys(lin.act_quantizer for lin in quant_linears(block)))


def _kv_quantizers(block: nn.Module) -> list[KVQuantizer]:
    return [m for m in block.modules() if isinstance(m, KVQuantizer)]


def _clip_parameters(block: nn.Module) -> list[nn.Parameter]:
    quantizers = _act_quantizers(block) + _kv_quantizers(block)
    return [q.clip_ratio for q in quantizers if isinstance(q.clip_ratio, nn.Parameter)]


@torch.no_grad()
def input_channel_means(block: nn.Module, quantizers: list[nn.Module], hidden: torch.Tensor, block_kwargs: dict,
                        batch_size: int) -> dict[nn.Module, torch.Tensor]:
    """Mean over all calibration tokens of each quantizer's input (activation quantizers: per channel;
    KV quantizers: per head and channel). Measured with quantization off: the rotated full-precision
    activations, as BASE-Q initialises its biases."""
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
        run_block(block, hidden, block_kwargs, batch_size)
    return {q: (sums[q] / counts[q]).float() for q in quantizers}


def _select(inputs: str, fp: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    return fp if inputs == "fp" else quantized


def train_stage1(block, family, m, w_bits: int, head_dim: int, inputs, targets, kwargs, label: str,
                 seed: int) -> dict:
    """Paired scales, R_v and clips against RTN-quantized weights (STE); then fuse the transforms."""
    device = inputs.device
    transforms = BlockTransforms(block, family, head_dim, m.paired_scale, m.learn_rv, m.rv_per_kv_head).to(device)
    for lin in quant_linears(block):
        lin.weight_quantizer = RTNWeightQuantizer(w_bits)
    bs = m.train_batch_size
    report = {"stage1_mse_before": block_mse(block, inputs, targets, kwargs, bs)}
    report["stage1_loss"] = train_block(
        block, inputs, targets, kwargs,
        [ParamGroup("scale", transforms.scale_parameters(), m.lr.scale),
         ParamGroup("rotation", transforms.rotation_parameters(), m.lr.rotation),
         ParamGroup("clip", _clip_parameters(block), m.lr.clip)],
        m.stage1_epochs, bs, label, seed)
    for lin in quant_linears(block):
        lin.weight_quantizer = None
    transforms.fuse()
    return report


def quantize_block_weights(block, family, m, q, inputs, kwargs) -> None:
    """GPTQ (or RTN) on the transformed block, activations unquantized as in GPTQ."""
    clip_search = enum_value(q.w_clip_search)
    with activation_quantization_disabled(block):
        if enum_value(m.weights) == "gptq":
            g = m.gptq
            gptq_block(block, family, inputs, kwargs, q.w_bits, clip_search, g.block_size, g.damp, g.act_order,
                       m.train_batch_size)
        else:
            quantize_block_rtn(block, q.w_bits, clip_search)


def train_stage2(block, m, fp_inputs, inputs, targets, kwargs, label: str, seed: int) -> dict:
    """Activation biases (initialised from the channel means of the fp inputs), unpaired scales and clips,
    with the weights frozen."""
    bs = m.train_batch_size
    act_quantizers = _act_quantizers(block)
    kv_quantizers = _kv_quantizers(block) if m.kv_bias else []
    if m.bias or m.kv_bias:
        targets_of_bias = (act_quantizers if m.bias else []) + kv_quantizers
        means = input_channel_means(block, targets_of_bias, fp_inputs, kwargs, bs)
        for quantizer in targets_of_bias:
            quantizer.add_bias(means[quantizer] if m.bias_init == "mean" else torch.zeros_like(means[quantizer]))
    if m.unpaired_scale:
        for quantizer in act_quantizers:
            quantizer.add_scale()
    biases = [qz.bias for qz in act_quantizers + kv_quantizers if qz.bias is not None]
    scales = [qz.scale for qz in act_quantizers if qz.scale is not None]
    report = {"stage2_mse_before": block_mse(block, inputs, targets, kwargs, bs)}
    report["stage2_loss"] = train_block(
        block, inputs, targets, kwargs,
        [ParamGroup("bias", biases, m.lr.bias), ParamGroup("scale", scales, m.lr.scale),
         ParamGroup("clip", _clip_parameters(block), m.lr.clip)],
        m.stage2_epochs, bs, label, seed)
    return report


def quantize(model, family, ctx) -> None:
    m, q = ctx.method, ctx.quant
    device, bs = ctx.device, m.train_batch_size
    attach_quantizers(model, family, q.a_bits, q.kv_bits, m.act_clip_ratio, m.kv_clip_ratio, learn_clip=m.learn_clip)
    apply_rotations(model, family, device, ctx.seed, enum_value(m.residual_rotation))
    head_dim = head_dim_of(model.config)
    train_inputs, gptq_inputs = enum_value(m.train_inputs), enum_value(m.gptq_inputs)
    stage1 = (m.paired_scale or m.learn_rv or m.learn_clip) and m.stage1_epochs > 0
    stage2 = (m.bias or m.unpaired_scale or m.learn_clip or m.kv_bias) and m.stage2_epochs > 0

    inputs = capture_block_inputs(model, family, ctx.calibration, device)
    x_fp, x_q, kwargs = inputs.hidden, inputs.hidden.clone(), inputs.kwargs
    report = ctx.report.setdefault("blocks", [])
    seconds = ctx.report.setdefault("timings_s", {"stage1": 0.0, "gptq": 0.0, "stage2": 0.0})
    dtype = next(model.parameters()).dtype
    blocks = family.blocks(model)
    for index, block in tqdm(iterate_blocks(model, family, device), total=len(blocks), desc="BASE-Q", unit="block"):
        block.float()
        with activation_quantization_disabled(block), torch.no_grad():
            y_fp = run_block(block, x_fp.float(), kwargs, bs)
        train_x = _select(train_inputs, x_fp, x_q).float()
        entry = {"block": index}

        start = time.perf_counter()
        if stage1:
            entry.update(train_stage1(block, family, m, q.w_bits, head_dim, train_x, y_fp, kwargs,
                                      f"block {index} stage 1", ctx.seed + index))
        seconds["stage1"] += time.perf_counter() - start

        start = time.perf_counter()
        quantize_block_weights(block, family, m, q, _select(gptq_inputs, x_fp, x_q).float(), kwargs)
        seconds["gptq"] += time.perf_counter() - start

        start = time.perf_counter()
        if stage2:
            entry.update(train_stage2(block, m, x_fp.float(), train_x, y_fp, kwargs, f"block {index} stage 2",
                                      ctx.seed + 7919 + index))
        for lin in quant_linears(block):
            lin.fuse_activation_bias()
        seconds["stage2"] += time.perf_counter() - start

        with torch.no_grad():
            entry["final_mse"] = block_mse(block, train_x, y_fp, kwargs, bs)
            x_q = run_block(block, x_q.float(), kwargs, bs).to(x_q.dtype)
        x_fp = y_fp.to(x_fp.dtype)
        block.to(dtype)
        report.append(entry)
