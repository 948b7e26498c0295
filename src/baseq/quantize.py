"""Steps every quantization method is composed of: put quantizers into the model, quantize its weights
(RTN or GPTQ), and switch activation quantization off while calibrating."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .blockwise import StopForward, block_forward, capture_block_inputs, iterate_blocks, run_block
from .gptq import HessianAccumulator, gptq_quantize
from .hadamard import has_hadamard
from .models.families import ModelFamily
from .modules import ATTENTION_IMPLEMENTATION, AttentionQuantizer, QuantLinear
from .quant import ActivationQuantizer, KVQuantizer, fake_quantize_symmetric, weight_scale


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attach_quantizers(model: nn.Module, family: ModelFamily, a_bits: int, kv_bits: int, act_clip: float,
                      kv_clip: float, rotate_qk: bool = False, learn_clip: bool = False,
                      kv_clip_per_head: bool = False) -> None:
    """Replace each block's linears by QuantLinear and give each attention an AttentionQuantizer. Linears
    that read the same tensor (q/k/v, gate/up) share one ActivationQuantizer: the input is quantized once,
    with one bias, scale and clip, as a kernel would do it. Learned KV clips are one per KV head with
    `kv_clip_per_head`, else one per quantizer."""
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    for block in family.blocks(model):
        for group in family.sequential_groups():
            first = block.get_submodule(group[0])
            if isinstance(first, QuantLinear):
                continue
            quantizer = ActivationQuantizer(first.in_features, a_bits, act_clip, learn_clip, consumers=len(group))
            for name in group:
                parent_name, child_name = name.rsplit(".", 1)
                setattr(block.get_submodule(parent_name), child_name,
                        QuantLinear(block.get_submodule(name), quantizer))
        block.get_submodule(family.attention).attention_quantizer = AttentionQuantizer(
            kv_bits, kv_clip, rotate_qk, learn_clip, kv_heads if kv_clip_per_head else None, head_dim_of(model.config))
    model.set_attn_implementation(ATTENTION_IMPLEMENTATION)


@torch.no_grad()
def _fuse_online_rotation(linear: QuantLinear) -> None:
    """W <- W Q for the online rotation Q the layer now applies to its input (so the layer's function is
    unchanged), in float64 through the fast transform: no dense Q is built (28672^2 for Llama-2-70B's R4)."""
    weight = linear.weight
    weight.data = linear.weight_from_input_basis(weight.detach().double()).to(weight.dtype)


def add_online_down_hadamard(block: nn.Module, family: ModelFamily) -> None:
    """R4: the down_proj input is rotated online by a Hadamard; its transpose goes into the weight."""
    down: QuantLinear = block.get_submodule(family.down_proj)
    down.online_hadamard = True
    _fuse_online_rotation(down)


def add_online_o_hadamard(block: nn.Module, family: ModelFamily, num_heads: int, mode: str) -> str:
    """QuaRot's online Hadamard at the o_proj input, its transpose fused into o_proj. mode "cross_heads"
    mixes the heads (H_heads x I; with the per-head R2 fused into v/o the input sees H_heads x H_head_dim, as
    QuaRot's code); a head count with no Hadamard falls back to "full", one Hadamard of the whole input.
    Returns the mode applied ("none", "cross_heads" or "full")."""
    o_proj: QuantLinear = block.get_submodule(family.o_proj)
    if mode == "cross_heads" and not has_hadamard(num_heads):
        mode = "full"
    if mode == "cross_heads":
        o_proj.online_head_groups = num_heads
    elif mode == "full":
        o_proj.online_hadamard = True
    elif mode != "none":
        raise ValueError(f"unknown o_proj Hadamard {mode!r}; use none, cross_heads or full")
    if mode != "none":
        _fuse_online_rotation(o_proj)
    return mode


@contextlib.contextmanager
def only_quantizers(model: nn.Module, keep: list[nn.Module]):
    """Activation and KV quantization off everywhere in `model` except in the quantizers `keep` (the authors'
    stage 1 quantizes only the down_proj input)."""
    kept = set(keep)
    quantizers = [m for m in model.modules() if isinstance(m, (ActivationQuantizer, KVQuantizer)) and m not in kept]
    saved = [q.bits for q in quantizers]
    for q in quantizers:
        q.bits = 16
    try:
        yield
    finally:
        for q, bits in zip(quantizers, saved):
            q.bits = bits


def quant_linears(module: nn.Module) -> Iterator[QuantLinear]:
    return (m for m in module.modules() if isinstance(m, QuantLinear))


def activation_quantization_disabled(model: nn.Module):
    """Weights are calibrated on unquantized activations (as in QuaRot/GPTQ)."""
    return only_quantizers(model, [])


@contextlib.contextmanager
def each_quantizer_input(quantizers: list[nn.Module], callback):
    """Call callback(quantizer, x) once for every tensor x a quantizer receives while the context is open.
    A quantizer shared by several linears (q/k/v, gate/up) is called once per linear with the same tensor;
    holding that tensor (not its id, which Python reuses) makes the check exact. x is what is quantized: after the
    layer's online rotation, where it has one."""
    last: dict[nn.Module, torch.Tensor] = {}

    def hook(module, args):
        if last.get(module) is not args[0]:
            last[module] = args[0]
            callback(module, ActivationQuantizer.quantized_input(args))

    handles = [q.register_forward_pre_hook(hook) for q in quantizers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def set_quantized_weight(linear: QuantLinear, dequantized: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
    linear.weight.data = dequantized.to(linear.weight.dtype)
    linear.weight_scale = scale.to(linear.weight.device)
    linear.weight_bits = bits


@torch.no_grad()
def quantize_weights_rtn(model: nn.Module, family: ModelFamily, bits: int, clip_search: str,
                         device: torch.device) -> None:
    if bits >= 16:
        return
    for _, block in tqdm(iterate_blocks(model, family, device), total=len(family.blocks(model)),
                         desc="RTN weights", unit="block"):
        quantize_block_rtn(block, bits, clip_search)


@torch.no_grad()
def quantize_block_rtn(block: nn.Module, bits: int, clip_search: str) -> None:
    if bits >= 16:
        return
    for linear in quant_linears(block):
        w = linear.weight.float()
        scale = weight_scale(w, bits, clip_search)
        set_quantized_weight(linear, fake_quantize_symmetric(w, scale, bits), scale, bits)


@torch.no_grad()
def gptq_block(block: nn.Module, family: ModelFamily, hidden: torch.Tensor, block_kwargs: dict, bits: int,
               clip_search: str, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
               batch_size: int = 1, normalize_tokens: bool = False) -> None:
    """GPTQ every linear of one block, group by group (qkv, o, gate/up, down), so each Hessian is measured
    on inputs produced by the already-quantized groups. `hidden` holds the block's calibration inputs; each
    micro-batch is cast to the block's dtype."""
    dtype = next(block.parameters()).dtype
    for group in family.sequential_groups():
        linears = [block.get_submodule(name) for name in group]
        # the linears of a group read one tensor through one shared quantizer: one Hessian serves them all.
        # Observing the quantizer's input sees it after any online rotation.
        hessian = HessianAccumulator(linears[0].in_features, hidden.device, normalize_tokens)

        def observe(_quantizer, x):
            hessian.add(x)
            raise StopForward   # the rest of the block does not change this group's Hessian

        with each_quantizer_input([linears[0].act_quantizer], observe):
            for start in range(0, hidden.shape[0], batch_size):
                try:
                    block_forward(block, hidden[start:start + batch_size].to(dtype), block_kwargs)
                except StopForward:
                    pass
        for lin in linears:
            q, scale = gptq_quantize(lin.weight, hessian.hessian, bits, clip_search, block_size, damp, act_order)
            set_quantized_weight(lin, q, scale, bits)


@torch.no_grad()
def quantize_weights_gptq(model: nn.Module, family: ModelFamily, calib_ids: torch.Tensor, bits: int,
                          clip_search: str, device: torch.device, block_size: int = 128, damp: float = 0.01,
                          act_order: bool = False, batch_size: int = 1, normalize_tokens: bool = False) -> None:
    """Sequential GPTQ over the model (QuaRot's recipe): activations unquantized, each block calibrated on
    the outputs of the already-quantized blocks before it."""
    if bits >= 16:
        return
    with activation_quantization_disabled(model):
        inputs = capture_block_inputs(model, family, calib_ids, device)
        hidden, kwargs = inputs.hidden, inputs.kwargs
        del inputs   # else block 0's inputs would stay on the device next to every later block's
        for _, block in tqdm(iterate_blocks(model, family, device), total=len(family.blocks(model)),
                             desc="GPTQ", unit="block"):
            gptq_block(block, family, hidden, kwargs, bits, clip_search, block_size, damp, act_order,
                       batch_size, normalize_tokens)
            hidden = run_block(block, hidden, kwargs, batch_size)
