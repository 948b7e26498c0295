"""The architecture of each conf/model preset, for planning a run without its checkpoint (baseq.planning).

The values are the public config.json values of the hub checkpoints the presets name (conf/model/*.yaml):
hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, num_hidden_layers, vocab_size,
tie_word_embeddings and the declared dtype. SmolLM2's were read back from the GGUF file the preset loads
(llama.* metadata; the file has no output.weight, so its head is tied). `attention_bias` is the family's:
Qwen2 has q/k/v biases, Llama has none.

`wikitext2_windows`: how many 2048-token WikiText-2 test windows the model's tokenizer gives, where a run
record measured it (metrics.wikitext2_windows); the Qwen2.5 models share one tokenizer. Left out where no
record has it.
"""

from __future__ import annotations

MODEL_SHAPES: dict[str, dict] = {
    "llama-2-7b": dict(hub_id="meta-llama/Llama-2-7b-hf", hidden_size=4096, intermediate_size=11008,
                       num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000,
                       tie_word_embeddings=False, checkpoint_dtype="float16"),
    "llama-2-13b": dict(hub_id="meta-llama/Llama-2-13b-hf", hidden_size=5120, intermediate_size=13824,
                        num_attention_heads=40, num_key_value_heads=40, num_hidden_layers=40, vocab_size=32000,
                        tie_word_embeddings=False, checkpoint_dtype="float16"),
    "llama-2-70b": dict(hub_id="meta-llama/Llama-2-70b-hf", hidden_size=8192, intermediate_size=28672,
                        num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80, vocab_size=32000,
                        tie_word_embeddings=False, checkpoint_dtype="float16"),
    "llama-3-8b": dict(hub_id="meta-llama/Meta-Llama-3-8B", hidden_size=4096, intermediate_size=14336,
                       num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
                       tie_word_embeddings=False, checkpoint_dtype="bfloat16"),
    "llama-3-70b": dict(hub_id="meta-llama/Meta-Llama-3-70B", hidden_size=8192, intermediate_size=28672,
                        num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80, vocab_size=128256,
                        tie_word_embeddings=False, checkpoint_dtype="bfloat16"),
    "llama-3.1-8b": dict(hub_id="meta-llama/Llama-3.1-8B", hidden_size=4096, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
                         tie_word_embeddings=False, checkpoint_dtype="bfloat16"),
    "llama-3.1-70b": dict(hub_id="meta-llama/Llama-3.1-70B", hidden_size=8192, intermediate_size=28672,
                          num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80, vocab_size=128256,
                          tie_word_embeddings=False, checkpoint_dtype="bfloat16"),
    "llama-3.2-1b": dict(hub_id="meta-llama/Llama-3.2-1B", hidden_size=2048, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=16, vocab_size=128256,
                         tie_word_embeddings=True, checkpoint_dtype="bfloat16"),
    "llama-3.2-3b": dict(hub_id="meta-llama/Llama-3.2-3B", hidden_size=3072, intermediate_size=8192,
                         num_attention_heads=24, num_key_value_heads=8, num_hidden_layers=28, vocab_size=128256,
                         tie_word_embeddings=True, checkpoint_dtype="bfloat16"),
    "qwen2.5-3b": dict(hub_id="Qwen/Qwen2.5-3B", hidden_size=2048, intermediate_size=11008,
                       num_attention_heads=16, num_key_value_heads=2, num_hidden_layers=36, vocab_size=151936,
                       tie_word_embeddings=True, checkpoint_dtype="bfloat16", attention_bias=True,
                       wikitext2_windows=146),
    "qwen2.5-14b": dict(hub_id="Qwen/Qwen2.5-14B", hidden_size=5120, intermediate_size=13824,
                        num_attention_heads=40, num_key_value_heads=8, num_hidden_layers=48, vocab_size=152064,
                        tie_word_embeddings=False, checkpoint_dtype="bfloat16", attention_bias=True,
                        wikitext2_windows=146),
    "qwen2.5-32b": dict(hub_id="Qwen/Qwen2.5-32B", hidden_size=5120, intermediate_size=27648,
                        num_attention_heads=40, num_key_value_heads=8, num_hidden_layers=64, vocab_size=152064,
                        tie_word_embeddings=False, checkpoint_dtype="bfloat16", attention_bias=True,
                        wikitext2_windows=146),
    "qwen2.5-coder-0.5b": dict(hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct", hidden_size=896, intermediate_size=4864,
                               num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=24,
                               vocab_size=151936, tie_word_embeddings=True, checkpoint_dtype="bfloat16",
                               attention_bias=True, wikitext2_windows=146),
    "smollm2-135m": dict(hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", hidden_size=576, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152,
                         tie_word_embeddings=True, checkpoint_dtype="bfloat16", wikitext2_windows=148),
}
