"""End-to-end prefill of a Llama-2-7B-shaped model with random weights (the paper's Figure 5), one GPU call.

  python experiments/bench_prefill.py [--batches 1 4 8 16 32 64] [--seq 2048] [--layers 32] [--out DIR]

Three models, timed on the same token batches (forward pass, no KV cache kept, logits of the last token):
  bf16   the transformers model as built;
  w4a4   quantized by the core (W4A4KV4 with R3 and R4 online Hadamards and BASE-Q's online bias and scale,
         RTN weights) and converted to the Triton runtime;
  w4a4-no-online   the same runtime model with the online Hadamards, bias and scale switched off.
The weights are random, so the down_proj's R4 is not folded into them (folding a random matrix changes
nothing measurable); the online transform runs as it would in a real model.
Prints a table of median times and speedups and writes DIR/bench_prefill.json. With --profile, one forward
pass of each model at the --profile batch is also run under torch.profiler and its CUDA time is split by
kernel kind (GEMMs, attention, quantizers, the rest), which shows where a speedup is lost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from baseq.models.families import family_of
from baseq.quantize import attach_quantizers, quant_linears, quantize_block_rtn
from baseq.runtime import KV4AttentionQuantizer, PackedInputQuantizer, convert_to_w4a4

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


# Kernel kinds for the --profile breakdown: (kind, substrings of CUDA kernel names); the first match wins.
KERNEL_KINDS = [
    ("w4a4 gemm", ("_w4a4_kernel",)),
    ("int4 weight unpack", ("_unpack_int4",)),
    ("activation quantizer", ("_quantize_activation", "_quantize_split_outer")),
    ("kv4 cache and R3 passes", ("_kv_pass", "_dequantize_kv")),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("cublas gemm (bf16 linears, R3, lm_head)", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key.lower() in lowered for key in keys)),
                "other (norms, rope, activations, copies)")


def profile_breakdown(model, ids: torch.Tensor) -> dict:
    """CUDA time of one forward pass by kernel kind, and the ten kernels with the most time."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)   # warm-up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
    kernels = [(e.key, e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
               if e.self_device_time_total > 0]
    kinds: dict[str, float] = {}
    for name, ms, _ in kernels:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    top = sorted(kernels, key=lambda k: -k[1])[:10]
    return {"total_ms": sum(kinds.values()), "by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:120], "ms": ms, "calls": c} for n, ms, c in top]}


def print_breakdown(label: str, breakdown: dict) -> None:
    total = breakdown["total_ms"]
    print(f"\n{label}: {total:.1f} ms of CUDA kernels in one forward pass")
    for kind, ms in breakdown["by_kind_ms"].items():
        print(f"  {kind:42s} {ms:9.2f} ms  {ms / total:6.1%}")
    for k in breakdown["top_kernels"]:
        print(f"    {k['ms']:9.2f} ms  {k['calls']:5d} calls  {k['name']}")


def time_prefill(model, ids: torch.Tensor, reps: int) -> float:
    """Median seconds of one forward pass over ids (after one warm-up pass)."""
    times = []
    with torch.no_grad():
        for i in range(reps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            end.record()
            torch.cuda.synchronize()
            if i:
                times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def quantize_for_runtime(model) -> None:
    family = family_of(model)
    attach_quantizers(model, family, a_bits=4, kv_bits=4, act_clip=1.0, kv_clip=1.0, rotate_qk=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for block in family.blocks(model):
        block.get_submodule(family.down_proj).online_hadamard = True
        for quantizer in {linear.act_quantizer for linear in quant_linears(block)}:
            quantizer.add_bias(torch.randn(quantizer.dim, device="cuda", generator=gen) * 0.01)
            quantizer.add_scale()
            quantizer.scale.data = torch.rand(quantizer.dim, device="cuda", generator=gen) + 0.5
        attention = block.get_submodule(family.attention).attention_quantizer
        heads, head_dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
        attention.k_quantizer.add_bias(torch.randn(heads, head_dim, device="cuda", generator=gen) * 0.01)
        attention.v_quantizer.add_bias(torch.randn(heads, head_dim, device="cuda", generator=gen) * 0.01)
        quantize_block_rtn(block, 4, "none")
    convert_to_w4a4(model, family)
    model.cuda()


def switch_off_online_ops(model) -> None:
    for module in model.modules():
        if isinstance(module, PackedInputQuantizer):
            module.bias = module.scale = module.hadamard_outer = module.hadamard_inner = None
        elif isinstance(module, KV4AttentionQuantizer):
            module.rotate_qk = False
            module.k_bias = module.v_bias = None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--profile", type=int, metavar="BATCH",
                        help="also profile one forward pass of each model at this batch size")
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=args.layers, **LLAMA2_7B, attn_implementation="sdpa"))
    torch.set_default_dtype(torch.float32)
    model.eval()
    batches = {b: torch.randint(0, 32000, (b, args.seq), device="cuda") for b in args.batches}
    rows = {b: {"batch": b, "tokens": b * args.seq} for b in args.batches}
    for b, ids in batches.items():
        rows[b]["bf16_s"] = time_prefill(model, ids, args.reps)
        print(f"bf16 batch {b:3d}: {rows[b]['bf16_s']:.4f} s", flush=True)
    bf16_peak = torch.cuda.max_memory_allocated() / 2**30
    profiles = {}
    profile_ids = torch.randint(0, 32000, (args.profile, args.seq), device="cuda") if args.profile else None
    if args.profile:
        profiles["bf16"] = profile_breakdown(model, profile_ids)
    quantize_for_runtime(model)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for b, ids in batches.items():
        rows[b]["w4a4_s"] = time_prefill(model, ids, args.reps)
        print(f"w4a4 batch {b:3d}: {rows[b]['w4a4_s']:.4f} s", flush=True)
    w4a4_peak = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        profiles["w4a4"] = profile_breakdown(model, profile_ids)
    switch_off_online_ops(model)
    for b, ids in batches.items():
        rows[b]["w4a4_no_online_s"] = time_prefill(model, ids, args.reps)
        print(f"w4a4 without online ops batch {b:3d}: {rows[b]['w4a4_no_online_s']:.4f} s", flush=True)
    if args.profile:
        profiles["w4a4 without online ops"] = profile_breakdown(model, profile_ids)
    for row in rows.values():
        row["speedup"] = row["bf16_s"] / row["w4a4_s"]
        row["speedup_no_online"] = row["bf16_s"] / row["w4a4_no_online_s"]
        row["online_overhead"] = row["w4a4_s"] / row["w4a4_no_online_s"] - 1
    result = {"device": torch.cuda.get_device_name(), "date": datetime.now(timezone.utc).isoformat(),
              "torch": torch.__version__, "command": "python " + " ".join(sys.argv), "layers": args.layers,
              "seq": args.seq, "rows": list(rows.values()), "peak_gib": {"bf16": bf16_peak, "w4a4": w4a4_peak},
              "profile_batch": args.profile, "profiles": profiles, "seconds": time.time() - started}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_prefill.json").write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, Llama-2-7B shape ({args.layers} layers), seq {args.seq}, median of {args.reps}")
    print(f"{'batch':>6}{'bf16 s':>10}{'w4a4 s':>10}{'speedup':>9}{'no-online s':>13}{'speedup':>9}{'online ovh':>12}")
    for r in rows.values():
        print(f"{r['batch']:>6}{r['bf16_s']:>10.4f}{r['w4a4_s']:>10.4f}{r['speedup']:>9.2f}"
              f"{r['w4a4_no_online_s']:>13.4f}{r['speedup_no_online']:>9.2f}{r['online_overhead']:>11.1%}")
    print(f"peak memory: bf16 {bf16_peak:.1f} GiB, w4a4 {w4a4_peak:.1f} GiB; {result['seconds']:.0f} s")
    for label, breakdown in profiles.items():
        print_breakdown(f"{label}, batch {args.profile}", breakdown)


if __name__ == "__main__":
    main()
