"""Issue 13's scale benchmark: a random-weight model of a preset's shape (Llama-2-70B by default) with a few
blocks, written as a sharded safetensors checkpoint one tensor at a time (never whole in memory), then
calibrated and evaluated lazily through run.py (model.lazy=true, eval=ppl: block-by-block perplexity), once
per depth and method. Prints and writes per run: quantize time and time per block, peak device memory per
stage, peak host memory, and the projection to the preset's full depth.

    python experiments/lazy_scale_bench.py --shape llama-2-70b --layers 2 6 --methods quarot baseq \\
        --out results/lazy_scale.json -- data_root=/root/data
    python experiments/lazy_scale_bench.py --shape llama-2-7b --layers 32 --methods quarot   # 7B end to end
    python experiments/lazy_scale_bench.py --layers 2 --methods baseq,method.train_precision=tf32

A method may carry its own run.py overrides after commas (`baseq,method.train_precision=tf32`); the overrides
after `--` go to every run. The checkpoints are written under --work (default: the system's temporary folder)
and deleted after their depth is done; each run's record lands in a folder beside the JSON (named after it).

The weights are random (normal, std 0.02; norms 1) in float16 and the tokenizer is a byte-level BPE trained
on the calibration text, so the perplexities mean nothing: memory and time are what is measured. What the
peaks should not do: grow with depth (device and host). Run it alone on its GPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from baseq import data  # noqa: E402
from baseq.model_shapes import MODEL_SHAPES  # noqa: E402


def write_random_checkpoint(folder: Path, shape: dict, layers: int, tokenizer, seed: int = 0) -> int:
    """A Llama checkpoint of `shape` with `layers` blocks: one safetensors shard per block plus one for the
    rest, and the index. Returns the bytes written."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    d, f = shape["hidden_size"], shape["intermediate_size"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = d // heads
    vocab = len(tokenizer)
    config = LlamaConfig(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=False,
                         max_position_embeddings=4096, dtype="float16")
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # drawn on the GPU where there is one: on the host, with the job script's two threads, a 70B-shaped block
    # took about half a minute (session 6)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)

    def normal(*size):
        return (torch.randn(*size, generator=gen, device=device) * 0.02).half().cpu()

    weight_map, total = {}, 0
    shards = [("model-rest.safetensors", {"model.embed_tokens.weight": normal(vocab, d),
                                          "model.norm.weight": torch.ones(d, dtype=torch.float16),
                                          "lm_head.weight": normal(vocab, d)})]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append((f"model-block{i:03d}.safetensors", {
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.float16),
            p + "self_attn.q_proj.weight": normal(heads * head_dim, d),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, d),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, d),
            p + "self_attn.o_proj.weight": normal(d, heads * head_dim),
            p + "mlp.gate_proj.weight": normal(f, d),
            p + "mlp.up_proj.weight": normal(f, d),
            p + "mlp.down_proj.weight": normal(d, f),
        }))
    for name, tensors in shards:   # one shard in memory at a time
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=1))
    return total


def run_one(model_dir: Path, name: str, method_overrides: list[str], results: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "run.py", "model=local", f"model.path={model_dir}", "model.lazy=true",
               "model.dtype=float16", f"method={name}", "eval=ppl", "compare_with=[]", f"results_dir={results}",
               "resume=false", *method_overrides, *overrides]
    start = time.perf_counter()
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    records = sorted((results / "runs").glob("*.json"))
    if out.returncode != 0 or not records:
        return {"command": shlex.join(command), "returncode": out.returncode, "wall_s": wall,
                "stderr_tail": out.stderr[-2000:]}
    record = json.loads(records[-1].read_text())
    return {"command": shlex.join(command), "returncode": 0, "wall_s": wall, "record": str(records[-1]),
            "status": record["status"], "timings_s": record["timings_s"], "peak_memory_gb": record["peak_memory_gb"],
            "wikitext2_ppl": record["metrics"].get("wikitext2_ppl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-2-70b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--methods", nargs="+", default=["quarot", "baseq"])
    parser.add_argument("--vocab", type=int, default=None, help="tokenizer/embedding size (default: the preset's)")
    parser.add_argument("--hidden", type=int, default=None, help="override the shape (tiny CPU checks)")
    parser.add_argument("--ffn", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results/lazy_scale.json"), help="the JSON to write")
    parser.add_argument("--work", type=Path, default=None, help="where the checkpoints are written (default: a "
                        "temporary folder; about 1.7 GB per 70B-shaped block)")
    parser.add_argument("overrides", nargs="*", help="run.py overrides, after --")
    args = parser.parse_args()

    shape = dict(MODEL_SHAPES[args.shape])
    for key, value in (("hidden_size", args.hidden), ("intermediate_size", args.ffn),
                       ("num_attention_heads", args.heads), ("num_key_value_heads", args.kv_heads)):
        if value is not None:
            shape[key] = value
    root = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("data_root=")), None)
    text, _ = data.wikitext2_text("train", root)
    tokenizer = data.train_bpe_tokenizer(text, args.vocab or shape["vocab_size"])
    report = {"command": shlex.join([sys.executable, *sys.argv]),
              "date": datetime.now(timezone.utc).isoformat(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "shape": {k: shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                               "num_key_value_heads")} | {"vocab_size": len(tokenizer)},
              "full_depth": shape["num_hidden_layers"], "runs": []}
    records = args.out.with_suffix("")   # results/lazy_scale.json -> results/lazy_scale/<run>/runs/*.json
    work = Path(tempfile.mkdtemp(prefix="baseq-lazy-scale-", dir=args.work))
    for layers in args.layers:
        model_dir = work / f"model-{layers}"
        written = write_random_checkpoint(model_dir, shape, layers, tokenizer)
        for method in args.methods:
            name, *method_overrides = method.split(",")
            label = name + "".join(f"-{o.split('=')[-1]}" for o in method_overrides)
            result = run_one(model_dir, name, method_overrides, records / f"{label}-{layers}", args.overrides)
            result |= {"layers": layers, "method": method, "checkpoint_gb": written / 2**30}
            if result["returncode"] == 0:
                quantize = result["timings_s"].get("quantize", 0.0)
                result["quantize_s_per_block"] = quantize / layers
                result["projected_quantize_h_full_depth"] = quantize / layers * report["full_depth"] / 3600
            report["runs"].append(result)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            peaks = result.get("peak_memory_gb", {})
            print(f"{method:<8}{layers:>4} blocks  rc={result['returncode']}  quantize "
                  f"{result.get('timings_s', {}).get('quantize', float('nan')):8.1f} s  device peak "
                  f"{max((peaks.get('device') or {0: float('nan')}).values()):7.2f} GiB  host peak "
                  f"{peaks.get('host') or float('nan'):6.2f} GiB", flush=True)
        shutil.rmtree(model_dir)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
