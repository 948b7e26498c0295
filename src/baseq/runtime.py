"""Real W4A4 execution: turn a model quantized by the core (QuantLinear with fake-quantized weights, online
Hadamard, BASE-Q's bias and scale; AttentionQuantizer for R3 and the KV cache) into one that holds packed
4-bit weights and runs the Triton kernels of `baseq_kernels`.

The converted model computes the same function as the fake-quant model: the integer GEMM is exact, the
quantizer kernels reproduce quant.py's rounding in the model's dtype, and the dequantization is folded into
the GEMM's fp32 epilogue. The kernels need CUDA, or TRITON_INTERPRET=1 on the CPU (slow; tests only).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .hadamard import hadamard_across_groups, hadamard_matrix, kronecker_factors
from .models.families import ModelFamily
from .modules import AttentionQuantizer, QuantLinear
from .quant import ActivationQuantizer, KVQuantizer, effective_clip


def load_kernels():
    """The baseq_kernels module, or a one-line UserError when Triton is missing."""
    try:
        import baseq_kernels
    except ImportError as err:  # triton missing
        raise UserError(f"the W4A4 runtime needs Triton ({err}); install it with pip install -e '.[kernels]'") from err
    return baseq_kernels


class PackedInputQuantizer(nn.Module):
    """Runtime twin of ActivationQuantizer (plus the owner's online Hadamard): one fused kernel call turns a
    linear's input into 4-bit codes. Linears that share the fake quantizer (q/k/v, gate/up) share this module
    too, and the input is quantized once: the result is kept for the next `consumers - 1` calls with the
    same tensor, then dropped."""

    def __init__(self, fake: ActivationQuantizer, online_hadamard: bool, consumers: int, dtype: torch.dtype,
                 device: torch.device, online_head_groups: int = 0):
        super().__init__()
        if fake.bits != 4:
            raise UserError(f"the W4A4 runtime needs 4-bit activations, this layer has {fake.bits}; "
                            f"use quant=w4a4kv4 (or another a_bits=4 preset)")
        self.dim, self.clip, self.consumers = fake.dim, effective_clip(fake, dtype).item(), consumers
        self.register_buffer("bias", None if fake.bias is None else fake.bias.detach().to(device, dtype))
        self.register_buffer("scale", None if fake.scale is None else fake.scale.detach().to(device, dtype))
        self.register_buffer("hadamard_outer", None)
        self.register_buffer("hadamard_inner", None)
        if online_hadamard:
            outer, inner = kronecker_factors(self.dim)
            self.hadamard_outer = None if outer is None else outer.to(device, dtype)
            self.hadamard_inner = inner.to(device, dtype)
        self._online_hadamard = None
        # QuaRot's Hadamard across heads (o_proj input) runs in torch before the kernel: the kernel's factors
        # act within contiguous blocks, not across them
        self.online_head_groups = online_head_groups
        self._last: tuple | None = None

    def forward(self, x: torch.Tensor):
        if self._last is not None and self._last[0] is x:
            _, result, left = self._last
            self._last = (x, result, left - 1) if left > 1 else None
            return result
        kernels = load_kernels()
        source = x
        if self.online_head_groups:
            x = hadamard_across_groups(x, self.online_head_groups)
        hadamard = None
        if self.hadamard_inner is not None:
            hadamard = self._online_hadamard
            if hadamard is None or hadamard.inner is not self.hadamard_inner or hadamard.outer is not self.hadamard_outer:
                # built from the buffers (after any .to()), once
                hadamard = self._online_hadamard = kernels.OnlineHadamard(self.hadamard_outer, self.hadamard_inner,
                                                                          self.dim, self.dim)
        result = kernels.quantize_activations(x.reshape(-1, self.dim), self.clip, self.bias, self.scale, hadamard)
        self._last = (source, result, self.consumers - 1) if self.consumers > 1 else None
        return result

    def extra_repr(self) -> str:
        return f"dim={self.dim}, clip={self.clip:.3f}, bias={self.bias is not None}, " \
               f"scale={self.scale is not None}, online_hadamard={self.hadamard_inner is not None}, " \
               f"online_head_groups={self.online_head_groups}"


class W4A4Linear(nn.Module):
    """y = dequant(Q(x)) @ dequant(W)^T + bias with packed int4 weights, run by the W4A4 GEMM kernel."""

    def __init__(self, linear: QuantLinear, input_quantizer: PackedInputQuantizer):
        super().__init__()
        if linear.weight_bits != 4 or linear.weight_scale is None:
            raise UserError(f"the W4A4 runtime needs 4-bit quantized weights, this layer has w_bits="
                            f"{linear.weight_bits}; quantize the model with w_bits=4 first")
        if linear.weight_quantizer is not None:
            raise UserError("the layer still carries a training-time weight quantizer; convert after quantization")
        kernels = load_kernels()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.input_quantizer = input_quantizer
        weight = linear.weight.detach().double()
        scale = linear.weight_scale.detach().double().reshape(-1, 1)
        codes = torch.round(weight / scale)
        off_grid = (weight / scale - codes).abs().max().item() if weight.numel() else 0.0
        # a half-precision weight holds code * scale rounded to 8 (bf16) or 11 (fp16) bits: |code| <= 8 moves
        # by at most 8 * 2^-9 = 0.016, far from the 0.5 that would change the rounding back to the code
        tolerance = 1e-3 if linear.weight.dtype == torch.float32 else 0.05
        if off_grid > tolerance or codes.min() < -8 or codes.max() > 7:
            raise UserError(f"weight of a {self.in_features}->{self.out_features} layer is not on its int4 grid "
                            f"(max distance {off_grid:.3g}); was it changed after quantization?")
        self.register_buffer("packed_weight", kernels.pack_int4(codes.to(torch.int8)))
        self.register_buffer("weight_scale", scale.reshape(-1).float())
        self.register_buffer("weight_code_sum", codes.sum(dim=1).float())
        bias = None if linear.bias is None else linear.bias.detach().double()
        act_bias = linear.act_quantizer.bias
        if act_bias is not None and not linear.activation_bias_fused:
            # the fake layer adds W_q B at run time; here it is part of the bias, computed once in float64
            compensation = (codes * scale) @ act_bias.detach().double()
            bias = compensation if bias is None else bias + compensation
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, x_scale, x_offset = self.input_quantizer(x)
        y = load_kernels().w4a4_matmul(codes, x_scale, x_offset, self.packed_weight, self.weight_scale,
                                   self.weight_code_sum, self.bias, out_dtype=x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class KV4AttentionQuantizer(nn.Module):
    """Runtime twin of AttentionQuantizer: R3 on queries and keys, then keys and values through the 4-bit
    cache kernels (quantized, then dequantized for attention). R3 runs inside the kernels: one pass rotates
    the queries, one rotates, quantizes and dequantizes the keys."""

    def __init__(self, fake: AttentionQuantizer, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.rotate_qk = fake.rotate_qk
        self.kv_bits = fake.k_quantizer.bits
        if self.kv_bits not in (4, 16):
            raise UserError(f"the runtime's KV cache is 4-bit (or unquantized), got kv_bits={self.kv_bits}")
        self.k_clip = self._clip(fake.k_quantizer, dtype, device)
        self.v_clip = self._clip(fake.v_quantizer, dtype, device)
        self.register_buffer("k_bias", self._bias(fake.k_quantizer, dtype, device))
        self.register_buffer("v_bias", self._bias(fake.v_quantizer, dtype, device))
        self._head_hadamard: torch.Tensor | None = None

    @staticmethod
    def _clip(quantizer: KVQuantizer, dtype: torch.dtype, device: torch.device) -> float | torch.Tensor:
        """A float, or one clip per KV head (learned per head) as fp32 values of `dtype` on the device."""
        clip = effective_clip(quantizer, dtype).detach()
        return clip.item() if clip.numel() == 1 else clip.flatten().float().to(device)

    @staticmethod
    def _bias(quantizer: KVQuantizer, dtype: torch.dtype, device: torch.device):
        return None if quantizer.bias is None else quantizer.bias.detach().to(device, dtype).contiguous()

    def head_hadamard(self, x: torch.Tensor) -> torch.Tensor:
        """The +-1 H_head_dim the kernels rotate by (built on first use, on x's device and dtype)."""
        h = self._head_hadamard
        if h is None or h.device != x.device or h.dtype != x.dtype or h.shape[0] != x.shape[-1]:
            h = self._head_hadamard = hadamard_matrix(x.shape[-1]).to(x.device, x.dtype)
        return h

    def forward(self, query, key, value):
        kernels = load_kernels()
        hadamard = self.head_hadamard(query) if self.rotate_qk else None
        if hadamard is not None:
            query = kernels.rotate_heads(query, hadamard)
        if self.kv_bits == 16:
            return query, key if hadamard is None else kernels.rotate_heads(key, hadamard), value
        return query, kernels.kv_cache_round_trip(key, self.k_clip, self.k_bias, hadamard), \
            kernels.kv_cache_round_trip(value, self.v_clip, self.v_bias)


@torch.no_grad()
def convert_to_w4a4(model: nn.Module, family: ModelFamily) -> nn.Module:
    """Replace, in place, every QuantLinear by a W4A4Linear and every AttentionQuantizer by its KV4 twin.
    Returns the model. Its dtype (that of the linears' weights) is the activations' dtype."""
    quant_linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not quant_linears:
        raise UserError("the model has no quantized linears; run a quantization method (e.g. method=quarot) first")
    dtype = quant_linears[0].weight.dtype
    for block in family.blocks(model):
        linears = {name: block.get_submodule(name) for name in family.linear_names()}
        consumers: dict[ActivationQuantizer, int] = {}
        for linear in linears.values():
            consumers[linear.act_quantizer] = consumers.get(linear.act_quantizer, 0) + 1
        runtime_quantizers: dict[ActivationQuantizer, PackedInputQuantizer] = {}
        for name, linear in linears.items():
            fake = linear.act_quantizer
            if fake not in runtime_quantizers:
                runtime_quantizers[fake] = PackedInputQuantizer(fake, linear.online_hadamard, consumers[fake], dtype,
                                                                linear.weight.device, linear.online_head_groups)
            parent_name, child_name = name.rsplit(".", 1)
            setattr(block.get_submodule(parent_name), child_name, W4A4Linear(linear, runtime_quantizers[fake]))
        attention = block.get_submodule(family.attention)
        attention.attention_quantizer = KV4AttentionQuantizer(attention.attention_quantizer, dtype,
                                                              linears[family.o_proj].weight.device)
    return model


def packed_weight_bytes(model: nn.Module) -> int:
    """Bytes of the packed int4 weights and their per-channel metadata (what decode reads per token)."""
    return sum(m.packed_weight.numel() + 4 * (m.weight_scale.numel() + m.weight_code_sum.numel())
               for m in model.modules() if isinstance(m, W4A4Linear))


__all__ = ["convert_to_w4a4", "load_kernels", "W4A4Linear", "PackedInputQuantizer", "KV4AttentionQuantizer", "packed_weight_bytes"]
