"""QuaRot (Ashkboos et al., 2024): random Hadamard R1 on the residual stream, Hadamard R2 on values,
online Hadamards R3 (queries/keys after RoPE) and R4 (down_proj input), then GPTQ or RTN weights."""

from __future__ import annotations

import torch

from ..blockwise import iterate_blocks
from ..hadamard import orthonormal_hadamard, random_hadamard
from ..quantize import add_online_down_hadamard, attach_quantizers
from ..rotation import fuse_norms_into_linears, rotate_residual, rotate_values, untie_embeddings, weight_pca_basis


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def apply_rotations(model, family, device: torch.device, seed: int, residual: str = "hadamard") -> None:
    """Fuse norms, then R1, R2 (Hadamard per layer), R4 (fused + online); R3 is switched on in the attention
    quantizers, which must be attached already. R1 is a random Hadamard, or with residual="pca_hadamard" the
    weight-PCA basis followed by it (BASE-Q's option): x -> x U H^T."""
    config = model.config
    head_dim = head_dim_of(config)
    untie_embeddings(model, family)
    fuse_norms_into_linears(model, family, device)
    r1 = random_hadamard(config.hidden_size, seed)
    if residual == "pca_hadamard":
        r1 = weight_pca_basis(model, family, device) @ r1.T
    elif residual != "hadamard":
        raise ValueError(f"unknown residual rotation {residual!r}; use 'hadamard' or 'pca_hadamard'")
    rotate_residual(model, family, r1, device)
    r2 = orthonormal_hadamard(head_dim)
    for _, block in iterate_blocks(model, family, device):
        rotate_values(block, family, r2, head_dim)
        add_online_down_hadamard(block, family)
        block.get_submodule(family.attention).attention_quantizer.rotate_qk = True


def quantize(model, family, ctx) -> None:
    attach_quantizers(model, family, ctx.quant.a_bits, ctx.quant.kv_bits, ctx.method.act_clip_ratio,
                      ctx.method.kv_clip_ratio)
    apply_rotations(model, family, ctx.device, ctx.seed)
    ctx.quantize_weights(model, family)
