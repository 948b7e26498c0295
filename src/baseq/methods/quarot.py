"""QuaRot (Ashkboos et al., 2024): random Hadamard R1 on the residual stream, Hadamard R2 on values,
online Hadamards R3 (queries/keys after RoPE), R4 (down_proj input) and, as QuaRot's code does, one across
the heads at the o_proj input; then GPTQ or RTN weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .base import MethodConfig, enum_value
from .registry import register

if TYPE_CHECKING:
    import torch

# torch and the model code are imported inside the functions: config composition imports this module for its
# registration and must not load them (registry.py)


def residual_rotation(model, family, device: torch.device, seed: int, kind: str,
                      note: Callable[[str], None]) -> torch.Tensor:
    """R1 (x -> x R1): a random Hadamard H D; "hadamard_unsigned": H alone (the BASE-Q authors' Sylvester
    matrix, which exists only for powers of two: other sizes get this project's Kronecker construction, and
    the run says so); "pca_hadamard": the weight-PCA basis followed by the random Hadamard, x -> x U H^T."""
    from ..hadamard import construction, orthonormal_hadamard, random_hadamard
    from ..rotation import weight_pca_basis

    d = model.config.hidden_size
    if kind == "hadamard":
        return random_hadamard(d, seed)
    if kind == "hadamard_unsigned":
        if d & (d - 1):
            note(f"residual_rotation=hadamard_unsigned: no Sylvester Hadamard of order {d} (not a power of two); "
                 f"using the constructed H_{d} = {construction(d)} without random signs")
        return orthonormal_hadamard(d)
    if kind == "pca_hadamard":
        return weight_pca_basis(model, family, device) @ random_hadamard(d, seed).T
    raise ValueError(f"unknown residual rotation {kind!r}; use hadamard, hadamard_unsigned or pca_hadamard")


def apply_rotations(model, family, device: torch.device, seed: int, residual: str = "hadamard",
                    o_proj_hadamard: str = "none", value_rotation: bool = True,
                    note: Callable[[str], None] | None = None) -> None:
    """Fuse norms, then R1, R2 (Hadamard per layer, unless value_rotation=False), R4 (fused + online) and the
    optional online Hadamard at the o_proj input; R3 is switched on in the attention quantizers, which must
    be attached already."""
    from ..blockwise import iterate_blocks
    from ..hadamard import orthonormal_hadamard
    from ..quantize import add_online_down_hadamard, add_online_o_hadamard, head_dim_of
    from ..rotation import fuse_norms_into_linears, rotate_residual, rotate_values, untie_embeddings

    note = note or (lambda message: None)
    config = model.config
    head_dim = head_dim_of(config)
    untie_embeddings(model, family)
    fuse_norms_into_linears(model, family, device)
    rotate_residual(model, family, residual_rotation(model, family, device, seed, residual, note), device)
    r2 = orthonormal_hadamard(head_dim)
    applied = set()
    for _, block in iterate_blocks(model, family, device):
        if value_rotation:
            rotate_values(block, family, r2, head_dim)
        add_online_down_hadamard(block, family)
        applied.add(add_online_o_hadamard(block, family, config.num_attention_heads, o_proj_hadamard))
        block.get_submodule(family.attention).attention_quantizer.rotate_qk = True
    if o_proj_hadamard == "cross_heads" and applied == {"full"}:
        note(f"o_proj_hadamard=cross_heads: no Hadamard of order {config.num_attention_heads} (the head count); "
             f"using one online Hadamard of the whole o_proj input ({config.num_attention_heads * head_dim}) instead")


def quantize(model, family, ctx) -> None:
    from ..quantize import attach_quantizers

    m = ctx.method
    attach_quantizers(model, family, ctx.quant.a_bits, ctx.quant.kv_bits, m.act_clip_ratio, m.kv_clip_ratio)
    apply_rotations(model, family, ctx.device, ctx.seed, o_proj_hadamard=enum_value(m.o_proj_hadamard),
                    note=ctx.note)
    ctx.quantize_weights(model, family)


register("quarot", schema=MethodConfig, quantize=quantize, label="QuaRot")
