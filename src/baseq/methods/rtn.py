"""Round-to-nearest without rotation: the floor of what quantization alone does."""

from ..quantize import attach_quantizers


def quantize(model, family, ctx) -> None:
    attach_quantizers(model, family, ctx.quant.a_bits, ctx.quant.kv_bits, ctx.method.act_clip_ratio,
                      ctx.method.kv_clip_ratio)
    ctx.quantize_weights(model, family)
