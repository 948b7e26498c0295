"""Model families described by mappings: where the blocks, norms and projections of a decoder live.

Adding a family = adding one `ModelFamily` to FAMILIES (keyed by the transformers architecture name).
Nothing else in the project checks model names."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class ModelFamily:
    name: str
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary_emb: str = "model.rotary_emb"
    attention: str = "self_attn"
    mlp: str = "mlp"
    # per block: a norm and the linears that read its output (the norm's weight is fused into them)
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"

    # --- accessors -------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def non_block_modules(self, model: nn.Module) -> list[nn.Module]:
        """What runs before/after the blocks (embedding, rotary embedding, final norm, head)."""
        names = (self.embed_tokens, self.rotary_emb, self.final_norm, self.lm_head)
        return [model.get_submodule(n) for n in names]

    def readers_of_attn_norm(self) -> tuple[str, ...]:
        return (self.q_proj, self.k_proj, self.v_proj)

    def readers_of_mlp_norm(self) -> tuple[str, ...]:
        return (self.gate_proj, self.up_proj)

    def residual_writers(self) -> tuple[str, ...]:
        return (self.o_proj, self.down_proj)

    def linear_names(self) -> tuple[str, ...]:
        return (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.gate_proj, self.up_proj, self.down_proj)

    def sequential_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears that share an input, in the order their inputs become available (GPTQ, calibration)."""
        return ((self.q_proj, self.k_proj, self.v_proj), (self.o_proj,), (self.gate_proj, self.up_proj),
                (self.down_proj,))


LLAMA = ModelFamily("llama")
# Qwen2 has the same layout; its q/k/v biases need no special handling (rotations act on inputs).
QWEN2 = ModelFamily("qwen2")

FAMILIES: dict[str, ModelFamily] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": QWEN2,
}


def family_of(model: nn.Module) -> ModelFamily:
    arch = type(model).__name__
    if arch not in FAMILIES:
        raise UserError(f"model architecture {arch} has no family adapter; supported: {', '.join(FAMILIES)} "
                        f"(add a ModelFamily in baseq/models/families.py)")
    return FAMILIES[arch]
