"""Modules a quantized model is made of: QuantLinear (quantized input, fake-quantized weight, optional
online Hadamard and BASE-Q's online bias/scale) and the attention hook for R3 and the KV cache.

The attention hook goes through transformers' public AttentionInterface: we register one attention
function, "baseq_sdpa", which rotates and quantizes q/k/v after RoPE and then calls the library's own sdpa.
No modeling file is forked or patched."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .hadamard import hadamard_across_groups, hadamard_transform
from .quant import ActivationQuantizer, KVQuantizer, call_fused, compiled_for_inference, effective_clip

ATTENTION_IMPLEMENTATION = "baseq_sdpa"


class QuantLinear(nn.Module):
    """y = W_q Q(S^a (H x) - B) + W_q B + b  (the paper's Eq. 15).

    H: optional online rotation of the input, its transpose already in W: a full Hadamard
       (`online_hadamard`: R4 on down_proj, or QuaRot's o_proj Hadamard where the head count has none), or
       one across `online_head_groups` attention heads (QuaRot's o_proj input; the per-head part is R2).
    B, S^a: BASE-Q's activation bias and unpaired scale, held by the activation quantizer.
    W_q: the weight, replaced in place by its fake-quantized value once weights are quantized; the per-channel
    scale is kept in `weight_scale` so the integer codes can be recovered exactly (round(W_q / scale)).

    While a method trains, `weight_transform`/`bias_transform` (equivalence.py) compute the weight and bias from
    the stored ones and learnable parameters, and `weight_quantizer` rounds the result (STE). They are plain
    attributes of this one class rather than torch parametrizations, which give every parametrized layer a class
    of its own: a compiled training step would then be traced again for every block.
    """

    def __init__(self, linear: nn.Linear, act_quantizer: ActivationQuantizer, online_hadamard: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.online_hadamard = online_hadamard
        self.online_head_groups = 0
        self.act_quantizer = act_quantizer
        self.weight_bits = 16
        self.register_buffer("weight_scale", None)
        # set while training (e.g. RTN with STE, so learned transforms see the weight grid); None afterwards
        self.weight_quantizer: nn.Module | None = None
        # set while training learnable equivalence transforms (equivalence.BlockTransforms); None afterwards
        self.weight_transform: nn.Module | None = None
        self.bias_transform: nn.Module | None = None
        # True once W_q B has been added to `bias` for good (see fuse_activation_bias)
        self.activation_bias_fused = False

    @property
    def has_online_rotation(self) -> bool:
        return self.online_hadamard or self.online_head_groups > 0

    def rotate_input(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """x -> x Q, the online rotation (transpose=True: x -> x Q^T)."""
        if self.online_head_groups:
            x = hadamard_across_groups(x, self.online_head_groups, transpose)
        if self.online_hadamard:
            x = hadamard_transform(x, self.in_features, transpose=transpose)
        return x

    def weight_in_input_basis(self, w: torch.Tensor) -> torch.Tensor:
        """W Q^T: the weight as it acts on the layer's input before the online rotation (W itself if none)."""
        return self.rotate_input(w, transpose=True) if self.has_online_rotation else w

    def weight_from_input_basis(self, w: torch.Tensor) -> torch.Tensor:
        """The inverse of weight_in_input_basis: W -> W Q."""
        return self.rotate_input(w) if self.has_online_rotation else w

    def transformed_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (default: the stored one) with the training-time transform M applied where the model's
        input is, before the online rotation Q: W Q^T M Q."""
        weight = self.weight if weight is None else weight
        if self.weight_transform is None:
            return weight
        return self.weight_from_input_basis(self.weight_transform(self.weight_in_input_basis(weight)))

    def transformed_bias(self, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        bias = self.bias if bias is None else bias
        if self.bias_transform is None or bias is None:
            return bias
        return self.bias_transform(bias)

    def effective_weight(self) -> torch.Tensor:
        weight = self.transformed_weight()
        return weight if self.weight_quantizer is None else self.weight_quantizer(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_quantizer(x, self.rotate_input if self.has_online_rotation else None)
        act_bias = self.act_quantizer.bias
        if act_bias is not None and not self.activation_bias_fused:
            # W_q Q(S^a x - B) + W_q B as W_q (Q(S^a x - B) + B): the compensation rides on the input, with no
            # product of its own. (A separate W_q B, as a matrix-vector or a one-row product, made inductor's
            # compiled backward fail with TF32 on, torch 2.11: "self must be a matrix", a reused buffer lost
            # its 2-D view.)
            x = x + act_bias.to(x.dtype)
        return F.linear(x, self.effective_weight(), self.transformed_bias())

    @torch.no_grad()
    def fuse_activation_bias(self) -> None:
        """Make W_q B part of the linear's own bias (computed in float64); B itself stays in the quantizer,
        which still subtracts it online."""
        if self.act_quantizer.bias is None or self.activation_bias_fused:
            return
        compensation = self.weight.double() @ self.act_quantizer.bias.double()
        if self.bias is None:
            self.bias = nn.Parameter(compensation.to(self.weight.dtype), requires_grad=False)
        else:
            self.bias.data = (self.bias.double() + compensation).to(self.bias.dtype)
        self.activation_bias_fused = True

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.weight_bits}, " \
               f"online_hadamard={self.online_hadamard}, online_head_groups={self.online_head_groups}, " \
               f"bias={self.bias is not None}"


class AttentionQuantizer(nn.Module):
    """Post-RoPE treatment of one attention layer: R3 (online Hadamard of queries and keys, which leaves
    q.k unchanged) and the per-head KV-cache quantizers."""

    def __init__(self, kv_bits: int, kv_clip: float = 1.0, rotate_qk: bool = False, learn_clip: bool = False,
                 kv_heads: int | None = None, head_dim: int | None = None):
        super().__init__()
        self.rotate_qk = rotate_qk
        self.head_dim = head_dim   # R3's order (None: the last dimension of the queries)
        self.k_quantizer = KVQuantizer(kv_bits, kv_clip, learn_clip, kv_heads)
        self.v_quantizer = KVQuantizer(kv_bits, kv_clip, learn_clip, kv_heads)

    def forward(self, query, key, value):
        if not self.rotate_qk and self.k_quantizer.bits >= 16 and self.v_quantizer.bits >= 16:
            return query, key, value
        if self._observed():   # calibration watches the cache quantizers' inputs: call them as modules
            query, key = self.rotate_queries_and_keys(query, key)
            return query, self.k_quantizer(key), self.v_quantizer(value)
        clips = effective_clip(self.k_quantizer, torch.float32), effective_clip(self.v_quantizer, torch.float32)
        return call_fused(_rotate_and_quantize_attention_inputs, key, self, query, key, value, *clips)

    def rotate_queries_and_keys(self, query, key):
        """R3, where it is on."""
        if not self.rotate_qk:
            return query, key
        return hadamard_transform(query, self.head_dim), hadamard_transform(key, self.head_dim)

    def _observed(self) -> bool:
        """Whether a hook is on a cache quantizer (BASE-Q's K/V bias init, the error analysis): the one-call path
        below does not go through their forward, so it would not fire."""
        return any(q._forward_pre_hooks or q._forward_hooks for q in (self.k_quantizer, self.v_quantizer))


# R3 and both cache quantizers as one compiled call in inference (quant.fused_inference), not a dozen eager launches
@compiled_for_inference
def _rotate_and_quantize_attention_inputs(quantizer: AttentionQuantizer, query, key, value, k_clip, v_clip):
    query, key = quantizer.rotate_queries_and_keys(query, key)
    return query, quantizer.k_quantizer.quantize_cache(key, k_clip), quantizer.v_quantizer.quantize_cache(value, v_clip)


def quantized_sdpa_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    quantizer = getattr(module, "attention_quantizer", None)
    if quantizer is not None:
        query, key, value = quantizer(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_IMPLEMENTATION, quantized_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
