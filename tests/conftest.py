"""Shared fixtures: tiny random Llama/Qwen2 models with the awkward sizes of real ones (hidden 576 = 36*16,
FFN 1536 = 12*128 and 4864 = 76*64), and the local data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; the flag must be set before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

REPO = Path(__file__).resolve().parents[1]

# pytest puts the checkout's src, kernels and root first on its own sys.path (pyproject's pythonpath); the
# subprocesses the tests start (python run.py, -c, -m, Slurm stand-in jobs) get the same through PYTHONPATH, or
# they would import whatever an editable install points at (another checkout's code).
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "kernels"), str(REPO)]
                                           + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def tiny_llama(hidden=576, ffn=1536, layers=2, heads=9, kv_heads=3, vocab=256, dtype=torch.float64, seed=0,
               tie=True):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    _randomize_norms(model)
    return model


def tiny_qwen2(hidden=576, ffn=4864, layers=2, heads=9, kv_heads=3, vocab=256, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    _randomize_norms(model)
    with torch.no_grad():  # random q/k/v biases, so that their handling under rotation is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def _randomize_norms(model):
    # fresh models have unit norm gains, which would hide a wrong norm fusion
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


@pytest.fixture
def data_root() -> Path:
    root = os.environ.get("BASEQ_DATA_ROOT")
    if not root:
        pytest.skip("BASEQ_DATA_ROOT is not set (the CI script sets it to ../shared/data)")
    path = Path(root)
    assert (path / "wikitext2" / "wiki.test.raw").is_file(), f"BASEQ_DATA_ROOT={root} has no wikitext2/wiki.test.raw"
    return path


def train_tiny_tokenizer(text: str, vocab_size: int = 512):
    """A byte-level BPE trained in well under a second: tiny models get a real tokenizer without a download."""
    from baseq.data import train_bpe_tokenizer

    return train_bpe_tokenizer(text, vocab_size)


SAMPLE_TEXT = (" = Valkyria Chronicles III = \n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ "
               "playing video game developed by Sega and Media.Vision for the PlayStation Portable . ") * 40


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny Llama and Qwen2 folders (float32) with a small trained tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = train_tiny_tokenizer(SAMPLE_TEXT)
    dirs = {}
    for name, make in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        model = make(hidden=64, ffn=192, heads=4, kv_heads=2, vocab=len(tokenizer), dtype=torch.float32)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture
def tiny_data_root(tmp_path) -> Path:
    """A data root in the local layout, small enough for tiny end-to-end runs."""
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(SAMPLE_TEXT.replace(" . ", " . \n \n") * 2)
    (tmp_path / "wikitext2" / "wiki.train.raw").write_text(SAMPLE_TEXT * 3)
    return tmp_path
