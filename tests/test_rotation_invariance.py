"""Rotations are exact: a rotated model with nothing quantized gives the same logits (float64)."""

import pytest
import torch

from baseq.hadamard import random_hadamard
from baseq.models.families import family_of
from baseq.quantize import attach_quantizers
from baseq.methods.quarot import apply_rotations
from baseq.rotation import fuse_norms_into_linears, rotate_residual, rotate_values, untie_embeddings
from conftest import tiny_llama, tiny_qwen2

CPU = torch.device("cpu")
# transformers' RMSNorm computes in float32 even in a float64 model, so "exact" means float32 round-off here;
# a wrong transform moves logits by 1e-3 or more (see the last test).
EXACT = dict(rtol=1e-5, atol=1e-5)


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama-576-1536", "qwen2-576-4864"])
def test_quarot_rotations_preserve_logits(make):
    model = make()
    ids = torch.randint(0, 256, (2, 33))
    reference = logits(model, ids)
    family = family_of(model)
    attach_quantizers(model, family, a_bits=16, kv_bits=16, act_clip=1.0, kv_clip=1.0)
    apply_rotations(model, family, CPU, seed=3)
    # the rotations really changed the weights...
    assert model.model.norm.weight.eq(1).all()
    assert model.model.layers[0].mlp.down_proj.online_hadamard
    assert model.model.layers[0].self_attn.attention_quantizer.rotate_qk
    # ...and the function did not
    torch.testing.assert_close(logits(model, ids), reference, **EXACT)


def test_each_rotation_alone_is_exact():
    model = tiny_llama(hidden=64, ffn=96, heads=4, kv_heads=2, layers=2)
    ids = torch.randint(0, 256, (1, 17))
    reference = logits(model, ids)
    family = family_of(model)
    untie_embeddings(model, family)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    fuse_norms_into_linears(model, family)
    torch.testing.assert_close(logits(model, ids), reference, **EXACT)
    rotate_residual(model, family, random_hadamard(64, seed=1))
    torch.testing.assert_close(logits(model, ids), reference, **EXACT)
    # per-KV-head value rotations, each a different orthogonal matrix
    r = torch.linalg.qr(torch.randn(2, 16, 16, dtype=torch.float64))[0]
    for block in model.model.layers:
        rotate_values(block, family, r, head_dim=16)
    torch.testing.assert_close(logits(model, ids), reference, **EXACT)


def test_rotation_without_norm_fusion_is_not_exact():
    """Guards the test above: rotating with unfused (random) norm gains must change the logits."""
    model = tiny_llama(hidden=64, ffn=96, heads=4, kv_heads=2)
    ids = torch.randint(0, 256, (1, 17))
    reference = logits(model, ids)
    family = family_of(model)
    untie_embeddings(model, family)
    rotate_residual(model, family, random_hadamard(64, seed=1))
    assert not torch.allclose(logits(model, ids), reference, atol=1e-3)


def test_pca_hadamard_residual_rotation_is_exact():
    model = tiny_qwen2(hidden=64, ffn=192, heads=4, kv_heads=2)
    ids = torch.randint(0, 256, (1, 21))
    reference = logits(model, ids)
    family = family_of(model)
    attach_quantizers(model, family, a_bits=16, kv_bits=16, act_clip=1.0, kv_clip=1.0)
    apply_rotations(model, family, CPU, seed=0, residual="pca_hadamard")
    torch.testing.assert_close(logits(model, ids), reference, **EXACT)
