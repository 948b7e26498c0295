"""BASE-Q's components each do what they are for, on tiny models (DESIGN.md section 5)."""


import pytest
import torch
from omegaconf import OmegaConf

from baseq.config import BaseQConfig, LearningRates, QuantConfig, register_configs
from baseq.equivalence import BlockTransforms
from baseq.methods import METHODS
from baseq.methods.base import MethodContext
from baseq.methods.quarot import apply_rotations
from baseq.models.families import family_of
from baseq.modules import QuantLinear
from baseq.quant import ActivationQuantizer
from baseq.quantize import attach_quantizers
from conftest import tiny_llama, tiny_qwen2

CPU = torch.device("cpu")
register_configs()


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_paired_scales_and_learned_rv_leave_the_fp_model_unchanged(make):
    model = make(hidden=64, ffn=192, heads=4, kv_heads=2, layers=2)
    family = family_of(model)
    ids = torch.randint(0, 256, (2, 19))
    reference = logits(model, ids)
    attach_quantizers(model, family, 16, 16, 1.0, 1.0)
    apply_rotations(model, family, CPU, seed=0)
    transforms = []
    for block in family.blocks(model):
        t = BlockTransforms(block, family, head_dim=16, paired_scale=True, learn_rv=True, rv_per_kv_head=True).double()
        with torch.no_grad():  # arbitrary, far-from-initial parameter values
            for p in t.scale_parameters():
                p.uniform_(-1.5, 1.5)
            for p in t.rotation_parameters():
                p.normal_(0, 0.5)
        transforms.append(t)
    v_weight = family.blocks(model)[0].self_attn.v_proj.weight.clone()
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)
    for t in transforms:
        t.fuse()
    block = family.blocks(model)[0]
    assert not hasattr(block.self_attn.v_proj, "parametrizations")
    assert torch.equal(block.self_attn.v_proj.weight, v_weight)  # fusing keeps the trained values
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)


def test_bias_correction_lowers_quantization_error_of_shifted_channels():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * 0.5 + torch.linspace(-3, 3, 64)  # channel means far from zero
    plain = ActivationQuantizer(64, bits=4)
    corrected = ActivationQuantizer(64, bits=4)
    corrected.add_bias(x.mean(0))
    err_plain = (plain(x) - x).pow(2).mean()
    # the layer adds W B back; for the quantizer alone that is + B
    err_corrected = (corrected(x) + corrected.bias - x).pow(2).mean()
    assert err_corrected < 0.5 * err_plain


def test_fused_activation_bias_is_exact_without_activation_error():
    lin = torch.nn.Linear(32, 8).double()
    q = ActivationQuantizer(32, bits=16)
    q.add_bias(torch.randn(32))
    layer = QuantLinear(lin, q).double()
    x = torch.randn(5, 32, dtype=torch.float64)
    expected = lin(x)
    torch.testing.assert_close(layer(x), expected)
    layer.fuse_activation_bias()
    assert layer.activation_bias_fused
    torch.testing.assert_close(layer(x), expected)


def make_ctx(ids, **overrides):
    mcfg = OmegaConf.structured(BaseQConfig(name="baseq", algorithm="baseq", **overrides))
    qcfg = OmegaConf.structured(QuantConfig(name="w4a4kv4"))
    return MethodContext(method=mcfg, quant=qcfg, device=CPU, seed=0, load_calibration=lambda: ids)


def run_baseq(seed=0, **overrides):
    torch.manual_seed(123)
    model = tiny_llama(hidden=64, ffn=192, heads=4, kv_heads=2, layers=2, dtype=torch.float32)
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))
    ctx = make_ctx(ids, stage1_epochs=2, stage2_epochs=2, train_batch_size=1, **overrides)
    torch.manual_seed(seed)
    METHODS["baseq"](model, family_of(model), ctx)
    return model, ids, ctx.report


def test_training_lowers_block_error_and_is_deterministic():
    model, ids, report = run_baseq()
    for entry in report["blocks"]:
        assert entry["final_mse"] < entry["stage1_mse_before"]
        assert entry["stage2_loss"][-1] <= entry["stage2_mse_before"]
    # the online tensors the kernels need are explicit per layer, and the compensation is fused
    down = model.model.layers[0].mlp.down_proj
    assert down.act_quantizer.bias is not None and down.act_quantizer.scale is not None
    assert down.activation_bias_fused and down.online_hadamard and down.weight_bits == 4
    again, _, _ = run_baseq()
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)


def test_ablation_switches_turn_components_off():
    model, _, report = run_baseq(learn_rv=False, bias=False, unpaired_scale=False, paired_scale=False,
                                 learn_clip=False)
    q = model.model.layers[0].mlp.down_proj.act_quantizer
    assert q.bias is None and q.scale is None and not isinstance(q.clip_ratio, torch.nn.Parameter)
    assert "stage1_loss" not in report["blocks"][0] and "stage2_loss" not in report["blocks"][0]


def test_diverging_training_stops_with_an_error_naming_block_and_stage():
    from baseq.errors import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match=r"block 0 stage 1"):
        run_baseq(lr=LearningRates(scale=float("inf"), clip=float("inf"), rotation=float("inf")))
