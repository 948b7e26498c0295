"""The W4A4 runtime: a model quantized by the core, converted to packed int4 weights and the Triton
kernels, computes what the fake-quant model computes."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("triton")

from baseq.config import MethodConfig, QuantConfig  # noqa: E402
from baseq.errors import UserError  # noqa: E402
from baseq.methods import METHODS  # noqa: E402
from baseq.methods.baseq import BaseQConfig  # noqa: E402
from baseq.methods.base import MethodContext  # noqa: E402
from baseq.models.families import family_of  # noqa: E402
from baseq.runtime import (KV4AttentionQuantizer, PackedInputQuantizer, W4A4Linear, convert_to_w4a4,  # noqa: E402
                           packed_weight_bytes)
from conftest import tiny_llama, tiny_qwen2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantized(method: str, model, bits: int = 4, **overrides):
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    schema = BaseQConfig if method == "baseq" else MethodConfig
    mcfg = OmegaConf.structured(schema(name=method, algorithm=method, **overrides))
    qcfg = OmegaConf.structured(QuantConfig(name=f"w{bits}a{bits}kv{bits}", w_bits=bits, a_bits=bits, kv_bits=bits,
                                            w_clip_search="none"))
    ctx = MethodContext(method=mcfg, quant=qcfg, device=torch.device("cpu"), seed=0, load_calibration=lambda: ids)
    METHODS[method].quantize(model, family_of(model), ctx)
    return model, ids


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def small_llama(**kw):
    return tiny_llama(hidden=64, ffn=192, heads=4, kv_heads=2, **kw)


def small_qwen2(**kw):   # FFN 320 = 20 * 16: an outer Hadamard factor of 20 (Paley) before the kernel
    return tiny_qwen2(hidden=128, ffn=320, heads=4, kv_heads=2, **kw)


@pytest.mark.parametrize("method,make,overrides", [
    ("quarot", small_llama, {"rotate": True}),
    ("baseq", small_llama, {"stage1_epochs": 1, "stage2_epochs": 1, "train_batch_size": 1, "kv_bias": True}),
    ("quarot", small_qwen2, {"rotate": True}),
    # QuaRot's o_proj Hadamard: across the 4 heads, and (3 heads have none) the full-width fallback
    ("quarot", small_llama, {"rotate": True, "o_proj_hadamard": "cross_heads"}),
    ("quarot", lambda **kw: tiny_llama(hidden=48, ffn=192, heads=3, kv_heads=1, **kw),
     {"rotate": True, "o_proj_hadamard": "cross_heads"}),
])
def test_runtime_model_computes_the_fake_quant_model(method, make, overrides):
    model, ids = quantized(method, make(dtype=torch.float32), **overrides)
    model.to(DEVICE)
    with torch.no_grad():
        expected = model(ids.to(DEVICE)).logits.cpu()
        convert_to_w4a4(model, family_of(model))
        assert sum(isinstance(m, W4A4Linear) for m in model.modules()) == 7 * len(model.model.layers)
        attention = [m for m in model.modules() if isinstance(m, KV4AttentionQuantizer)]
        assert len(attention) == len(model.model.layers)
        o_proj = model.model.layers[0].self_attn.o_proj
        if overrides.get("o_proj_hadamard"):
            assert o_proj.input_quantizer.online_head_groups == 4 or o_proj.input_quantizer.hadamard_inner is not None
        if method == "baseq":   # the BASE-Q terms reach the runtime: online bias and scale, K/V bias
            inputs = [m for m in model.modules() if isinstance(m, PackedInputQuantizer)]
            assert all(q.bias is not None and q.scale is not None for q in inputs)
            assert all(a.k_bias is not None and a.v_bias is not None for a in attention)
        got = model(ids.to(DEVICE)).logits.cpu()
    # identical up to fp32 summation order, which can move an activation code by one at a rounding boundary
    assert relative_error(got, expected) < 2e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1)) or relative_error(got, expected) < 1e-3


def test_packed_weights_are_a_quarter_of_bf16():
    model, _ = quantized("quarot", tiny_llama(layers=1, dtype=torch.float32), rotate=True)
    linear_params = sum(m.weight.numel() for name, m in model.named_modules()
                        if name.startswith("model.layers") and hasattr(m, "weight_scale") and m.weight_scale is not None)
    convert_to_w4a4(model, family_of(model))
    # K = 576 pads to 640 for the in-projections; metadata is 8 bytes per output channel
    assert packed_weight_bytes(model) < 0.3 * 2 * linear_params


def test_conversion_refuses_models_it_cannot_run():
    fp = tiny_llama(dtype=torch.float32)
    with pytest.raises(UserError, match="no quantized linears"):
        convert_to_w4a4(fp, family_of(fp))
    w8, _ = quantized("rtn", tiny_llama(dtype=torch.float32), bits=8)
    with pytest.raises(UserError, match="4-bit activations"):
        convert_to_w4a4(w8, family_of(w8))
