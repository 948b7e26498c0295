"""save_quantized / load_quantized: a quantized model saved to safetensors + manifest and rebuilt in a
fresh process-like state gives the same logits; bad folders are one-line errors."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from baseq.config import MethodConfig, QuantConfig, ModelConfig
from baseq.errors import UserError
from baseq.methods import METHODS
from baseq.methods.baseq import BaseQConfig
from baseq.methods.base import MethodContext
from baseq.models.families import family_of
from baseq.quant import ActivationQuantizer, KVQuantizer
from baseq.saving import MANIFEST, load_quantized_model, read_manifest, save_quantized_model
from conftest import SAMPLE_TEXT, tiny_llama, train_tiny_tokenizer


def method_config(name: str):
    if name == "baseq":
        cfg = OmegaConf.structured(BaseQConfig(name="baseq", algorithm="baseq", stage1_epochs=1, stage2_epochs=1,
                                               train_batch_size=2))
    else:
        cfg = OmegaConf.structured(MethodConfig(name="quarot", algorithm="quarot", rotate=True, weights="gptq",
                                                act_clip_ratio=0.9, kv_clip_ratio=0.95))
    return cfg


def quantized_tiny_llama(method: str):
    tokenizer = train_tiny_tokenizer(SAMPLE_TEXT)
    model = tiny_llama(hidden=64, ffn=192, heads=4, kv_heads=2, vocab=len(tokenizer), dtype=torch.float32)
    model.config.use_cache = False
    family = family_of(model)
    torch.manual_seed(0)
    calibration = torch.randint(0, len(tokenizer), (4, 32))
    ctx = MethodContext(method=method_config(method), quant=OmegaConf.structured(QuantConfig(name="w4a4kv4",
                        w_clip_search="none")), device=torch.device("cpu"), seed=0, load_calibration=lambda: calibration)
    METHODS[method].quantize(model, family, ctx)
    return model, tokenizer, ctx


@pytest.mark.parametrize("method", ["quarot", "baseq"])
def test_saved_model_loads_with_identical_logits(method, tmp_path):
    model, tokenizer, ctx = quantized_tiny_llama(method)
    model_cfg = OmegaConf.structured(ModelConfig(name="tiny", path="/nowhere"))
    folder = save_quantized_model(model, tokenizer, tmp_path / "q", ctx.method, ctx.quant, model_cfg,
                                  info={"run_id": "r1"})
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["run_id"] == "r1" and manifest["method"]["name"] == method
    # the manifest records the online flags and which optional tensors each quantizer holds
    assert manifest["modules"]["model.layers.0.mlp.down_proj"]["attributes"]["online_hadamard"] is True
    assert manifest["modules"]["model.layers.0.self_attn.attention_quantizer"]["attributes"]["rotate_qk"] is True
    act = manifest["modules"]["model.layers.0.self_attn.q_proj.act_quantizer"]["tensors"]
    if method == "baseq":
        assert act["bias"]["shape"] == [64] and act["scale"]["shape"] == [64]
    else:
        assert act.get("bias", {}).get("shape") is None   # no bias: absent, or an empty slot
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pkl"))

    loaded, loaded_tokenizer, _, _ = load_quantized_model(folder)
    ids = torch.tensor([tokenizer(SAMPLE_TEXT[:300])["input_ids"][:48]])
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert torch.equal(expected, got)
    assert loaded_tokenizer(SAMPLE_TEXT[:50])["input_ids"] == tokenizer(SAMPLE_TEXT[:50])["input_ids"]
    # the q/k/v quantizer is still one module shared by the three projections
    attn = loaded.model.layers[0].self_attn
    assert attn.q_proj.act_quantizer is attn.k_proj.act_quantizer is attn.v_proj.act_quantizer
    kinds = {type(m) for m in loaded.modules()}
    assert ActivationQuantizer in kinds and KVQuantizer in kinds


def test_manifest_recreates_tensors_a_fresh_build_does_not_have(tmp_path):
    """A quantizer tensor the rebuild does not create by itself (a per-head clip, say) is created from the
    manifest's shape, so loading does not depend on the quantizers' attribute names."""
    model, tokenizer, ctx = quantized_tiny_llama("quarot")
    kq = model.model.layers[1].self_attn.attention_quantizer.k_quantizer
    kq.register_buffer("per_head_extra", torch.arange(6.0).reshape(2, 3))
    folder = save_quantized_model(model, tokenizer, tmp_path / "q", ctx.method, ctx.quant,
                                  OmegaConf.structured(ModelConfig(name="tiny", path="/nowhere")))
    loaded, *_ = load_quantized_model(folder)
    assert torch.equal(loaded.model.layers[1].self_attn.attention_quantizer.k_quantizer.per_head_extra,
                       torch.arange(6.0).reshape(2, 3))


def test_a_folder_without_a_manifest_is_one_line(tmp_path):
    with pytest.raises(UserError, match="holds no manifest.json; give the folder a save_quantized=true run"):
        read_manifest(tmp_path)
