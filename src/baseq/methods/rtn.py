"""Round-to-nearest without rotation: the floor of what quantization alone does."""

from .base import MethodConfig
from .registry import register


def quantize(model, family, ctx) -> None:
    from ..quantize import attach_quantizers  # torch and the model code: only when a run quantizes (registry.py)

    attach_quantizers(model, family, ctx.quant.a_bits, ctx.quant.kv_bits, ctx.method.act_clip_ratio,
                      ctx.method.kv_clip_ratio)
    ctx.quantize_weights(model, family)


register("rtn", schema=MethodConfig, quantize=quantize, label="RTN")
