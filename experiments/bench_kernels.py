"""Kernel benchmark (one GPU call): each Triton kernel against torch bf16 in the same run, as ratios.

  python experiments/bench_kernels.py [--quick] [--out DIR]

Prints, and writes to DIR/bench_kernels.json:
  * the measured ceilings: device copy bandwidth (bytes read + written) and cuBLAS bf16 matmul rate;
  * W4A4 GEMM vs torch bf16 F.linear at Llama-2-7B and Llama-3-8B shapes, M in {1, 16, 2048, 8192, 16384};
    M <= 16 is timed as CUDA-graph replays cycling over enough weight copies to overflow L2;
  * the fused activation quantizer (with and without the online Hadamard, bias and scale) vs its memory floor
    (bytes in + bytes out over the measured copy bandwidth);
  * the KV4 cache kernels (write, read, and the prefill runtime's one-pass round trip) vs their floors.
Each GEMM is checked against the fp32 matmul of its dequantized operands before it is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from baseq.hadamard import hadamard_matrix, kronecker_factors
from baseq_kernels import (OnlineHadamard, activation, dequantize_kv, kv_cache_round_trip, pack_int4,
                           quantize_activations, quantize_kv, rotate_heads, unpack_int4_codes, w4a4_matmul)
from baseq_kernels.gemm import _w4a4_decode, _w4a4_prefill

SHAPES = {  # name: (N, K) of y = x W^T
    "llama2-7b": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)},
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
L2_OVERFLOW_BYTES = 256 << 20


def median_ms(fn, graph: bool = False) -> float:
    if graph:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.randn(256 << 20, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (ms * 1e-3)


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    return 2 * 8192**3 / (ms * 1e-3)


def random_w4(n: int, k: int):
    codes = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
    scale = torch.rand(n, device="cuda") * 0.01 + 0.001
    return codes, scale, pack_int4(codes), codes.float().sum(1)


def bench_gemm(m: int, n: int, k: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    codes_w, w_scale, packed, w_sum = random_w4(n, k)
    bias = torch.randn(n, device="cuda")
    xq, xs, xo = quantize_activations(x)
    # check: the kernel against the fp32 matmul of the dequantized operands
    rows = min(m, 256)
    deq_x = (xq[:rows, :k].float() * xs[:rows, None] + xo[:rows, None])
    ref = deq_x @ (codes_w.float() * w_scale[:, None]).T + bias
    out = w4a4_matmul(xq, xs, xo, packed, w_scale, w_sum, bias)
    err = ((out[:rows].float() - ref).norm() / ref.norm()).item()
    w_bf16 = (codes_w.to(torch.bfloat16) * w_scale[:, None].to(torch.bfloat16))
    decode = m <= 16
    if decode:  # cycle over weight copies so that L2 holds none of them when it is read again
        copies = max(1, math.ceil(L2_OVERFLOW_BYTES / (n * k * 2)))
        bf16_ws = [w_bf16] + [w_bf16.clone() for _ in range(copies - 1)]
        copies4 = max(1, math.ceil(L2_OVERFLOW_BYTES / (n * k // 2)))
        packs = [packed] + [packed.clone() for _ in range(copies4 - 1)]
        t_bf16 = median_ms(lambda: [F.linear(x, w) for w in bf16_ws], graph=True) / len(bf16_ws)
        t_w4 = median_ms(lambda: [w4a4_matmul(xq, xs, xo, p, w_scale, w_sum, bias) for p in packs],
                         graph=True) / len(packs)
    else:
        t_bf16 = median_ms(lambda: F.linear(x, w_bf16))
        t_w4 = median_ms(lambda: w4a4_matmul(xq, xs, xo, packed, w_scale, w_sum, bias))
        t_inloop = median_ms(lambda: w4a4_matmul(xq, xs, xo, packed, w_scale, w_sum, bias, unpack_first=False))
    tuner = _w4a4_decode if m <= 64 else _w4a4_prefill
    cfg = tuner.best_config
    extra = {} if decode else {"inloop_unpack_ms": t_inloop, "inloop_speedup": t_bf16 / t_inloop}
    return {**extra, "m": m, "n": n, "k": k, "bf16_ms": t_bf16, "w4a4_ms": t_w4, "speedup": t_bf16 / t_w4,
            "rel_err": err, "w4a4_tops": 2 * m * n * k / (t_w4 * 1e-3) / 1e12,
            "config": f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"}


def bench_weight_layouts(m: int, n: int, k: int) -> dict:
    """Packed int4 weights as the runtime stores them (from UNPACK_MIN_M tokens: an unpack pass, then the int8
    GEMM) against int8-stored codes (the GEMM alone), and the unpack pass alone, at one shape."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    codes_w, w_scale, packed, w_sum = random_w4(n, k)
    xq, xs, xo = quantize_activations(x)
    int8_w = torch.zeros(n, xq.shape[1], dtype=torch.int8, device="cuda")
    int8_w[:, :k] = codes_w
    same = torch.equal(w4a4_matmul(xq, xs, xo, packed, w_scale, w_sum), w4a4_matmul(xq, xs, xo, int8_w, w_scale, w_sum))
    w_bf16 = codes_w.to(torch.bfloat16) * w_scale[:, None].to(torch.bfloat16)
    t_bf16 = median_ms(lambda: F.linear(x, w_bf16))
    t_packed = median_ms(lambda: w4a4_matmul(xq, xs, xo, packed, w_scale, w_sum))
    t_int8 = median_ms(lambda: w4a4_matmul(xq, xs, xo, int8_w, w_scale, w_sum))
    t_unpack = median_ms(lambda: unpack_int4_codes(packed))
    cfg = _w4a4_prefill.best_config
    return {"m": m, "n": n, "k": k, "bf16_ms": t_bf16, "packed_ms": t_packed, "int8_ms": t_int8,
            "unpack_ms": t_unpack,
            "packed_speedup": t_bf16 / t_packed, "int8_speedup": t_bf16 / t_int8, "identical": same,
            "int8_config": f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"}


def bench_quantizer(m: int, k: int, online: bool, bandwidth: float, fuse_outer: bool = True) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = scale = hadamard = None
    if online:
        bias = torch.randn(k, device="cuda", dtype=torch.bfloat16) * 0.1
        scale = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
        outer, inner = kronecker_factors(k)
        hadamard = OnlineHadamard(None if outer is None else outer.to("cuda", torch.bfloat16),
                                  inner.to("cuda", torch.bfloat16), k, k, fuse_outer=fuse_outer)
    t = median_ms(lambda: quantize_activations(x, 1.0, bias, scale, hadamard))
    floor_bytes = m * k * 2 + m * math.ceil(k / 128) * 128 + 8 * m
    floor_ms = floor_bytes / bandwidth * 1e3
    row = {"m": m, "k": k, "online": online, "ms": t, "floor_ms": floor_ms, "vs_floor": t / floor_ms}
    if hadamard is not None and hadamard.outer is not None:
        row["outer_factor"] = hadamard.outer.shape[0]
        row["outer_in_kernel"] = hadamard.left_factor is not None
        if hadamard.left_factor is None:
            row["outer_matmul_ms"] = median_ms(
                lambda: torch.matmul(hadamard.outer.T, x.view(m, hadamard.outer.shape[0], -1)))
    return row


# Launch constants of the quantizer compared by --quantizer-variants (module attributes of baseq_kernels.activation).
QUANTIZER_VARIANTS = [
    {},  # the defaults
    {"SINGLE_PASS_MAX_K": 16384},  # K=11008 without a Hadamard in one pass (the first kernel's layout)
    # the 172 outer factor of 11008 (split tiles): pipeline depth, warps
    {"SPLIT_OUTER_STAGES": 2}, {"SPLIT_OUTER_STAGES": 4},
    {"SPLIT_OUTER_WARPS": 16}, {"SPLIT_OUTER_WARPS": 16, "SPLIT_OUTER_STAGES": 4},
    # the 32 outer factor of 4096: resident programs per SM, or one program per row group
    {"RESIDENT_OUTER_PROGRAMS_PER_SM": 1}, {"RESIDENT_OUTER_PROGRAMS_PER_SM": 3},
    {"RESIDENT_OUTER_PROGRAMS_PER_SM": 4}, {"RESIDENT_OUTER_MIN": 256},
    {"fuse_outer": False},         # outer factor as a matmul before the kernel (the first design)
]


def quantizer_variants(bandwidth: float) -> list[dict]:
    rows = []
    defaults = {name: getattr(activation, name) for variant in QUANTIZER_VARIANTS for name in variant
                if name != "fuse_outer"}
    for variant in QUANTIZER_VARIANTS:
        for name, value in variant.items():
            if name != "fuse_outer":
                setattr(activation, name, value)
        for k in (4096, 11008):
            for online in (False, True) if not variant or "SINGLE_PASS_MAX_K" in variant else (True,):
                row = {"variant": variant or "default",
                       **bench_quantizer(16384, k, online, bandwidth, variant.get("fuse_outer", True))}
                rows.append(row)
                print(f"quantizer variant {str(variant or 'default'):32s} K={k:6d} online={online!s:5s} "
                      f"{row['ms']:.4f} ms  x{row['vs_floor']:.2f} floor", flush=True)
        for name, value in defaults.items():
            setattr(activation, name, value)
    return rows


def bench_kv(b: int, h: int, s: int, d: int, bandwidth: float) -> list[dict]:
    """The cache write (quantize_kv), the read (dequantize_kv), the one-pass round trip the prefill runtime
    uses (with and without R3 fused), R3 on queries, and R3 as the torch matmul it replaces, on a key tensor in
    HF's [B, H, S, D] view of [B, S, H, D] (strided), each vs its memory floor."""
    x = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    bias = torch.randn(h, d, device="cuda", dtype=torch.bfloat16) * 0.1
    n, rows = x.numel(), b * h * s
    packed, scale, zero = quantize_kv(x, 1.0, bias)
    hadamard = hadamard_matrix(d).to("cuda", torch.bfloat16)
    hadamard_scaled = (hadamard_matrix(d) / math.sqrt(d)).to("cuda", torch.bfloat16)
    cases = {  # name: (call, bytes moved)
        "quantize": (lambda: quantize_kv(x, 1.0, bias), 2 * n + n // 2 + 8 * rows),
        "dequantize": (lambda: dequantize_kv(packed, scale, zero, torch.bfloat16, bias), n // 2 + 8 * rows + 2 * n),
        "round trip": (lambda: kv_cache_round_trip(x, 1.0, bias), 4 * n),
        "round trip with R3": (lambda: kv_cache_round_trip(x, 1.0, bias, hadamard), 4 * n),
        "R3 on queries": (lambda: rotate_heads(x, hadamard), 4 * n),
        "R3 as torch matmul": (lambda: torch.matmul(x, hadamard_scaled), 4 * n),
    }
    rows_out = []
    for name, (call, nbytes) in cases.items():
        t = median_ms(call)
        floor_ms = nbytes / bandwidth * 1e3
        rows_out.append({"kernel": name, "shape": [b, h, s, d], "ms": t, "floor_ms": floor_ms, "vs_floor": t / floor_ms})
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one model's shapes, M in {16, 2048}")
    parser.add_argument("--ms", type=int, nargs="+", help="GEMM token counts (default 1 16 2048 8192 16384)")
    parser.add_argument("--skip-layouts", action="store_true")
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--quantizer-variants", action="store_true",
                        help="also time the quantizer's launch variants (QUANTIZER_VARIANTS) at M=16384")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--layouts-only", action="store_true",
                        help="only the packed-vs-int8 weight comparison (Llama-2-7B shapes)")
    parser.add_argument("--layout-ms", type=int, nargs="+", default=[8192],
                        help="token counts of the weight-layout comparison (default 8192)")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.now(timezone.utc).isoformat(),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "command": "python " + " ".join(sys.argv)}
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    result.update(copy_bandwidth_tbs=bandwidth / 1e12, bf16_matmul_tflops=rate / 1e12)
    print(f"{result['device']}: copy {bandwidth / 1e12:.2f} TB/s (read + write), bf16 matmul {rate / 1e12:.0f} "
          f"TFLOP/s", flush=True)
    layouts = []
    for name, (n, k) in ({} if args.skip_layouts else SHAPES["llama2-7b"]).items():
        for m in args.layout_ms:
            row = {"layer": name, **bench_weight_layouts(m, n, k)}
            layouts.append(row)
            print(f"layout {name:8s} M={m:5d} bf16 {row['bf16_ms']:.4f} ms  packed int4 {row['packed_ms']:.4f} ms "
                  f"x{row['packed_speedup']:.2f}  int8-stored {row['int8_ms']:.4f} ms x{row['int8_speedup']:.2f}  "
                  f"unpack alone {row['unpack_ms']:.4f} ms  identical={row['identical']}  {row['int8_config']}",
                  flush=True)
    result["weight_layouts"] = layouts
    if args.layouts_only:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_layouts.json").write_text(json.dumps(result, indent=1))
        return
    ms = args.ms or ([16, 2048] if args.quick else [1, 16, 2048, 8192, 16384])
    models = [] if args.skip_gemm else list(SHAPES)[:1] if args.quick else list(SHAPES)
    gemm = []
    for model in models:
        for name, (n, k) in SHAPES[model].items():
            for m in ms:
                row = {"model": model, "layer": name, **bench_gemm(m, n, k)}
                gemm.append(row)
                print(f"gemm {model:10s} {name:8s} M={m:6d} N={n:6d} K={k:6d}  bf16 {row['bf16_ms']:8.4f} ms  "
                      f"w4a4 {row['w4a4_ms']:8.4f} ms  x{row['speedup']:.2f}  "
                      + (f"(in-loop unpack x{row['inloop_speedup']:.2f})  " if "inloop_speedup" in row else "")
                      + f"err {row['rel_err']:.1e}  "
                      f"{row['config']}", flush=True)
    result["gemm"] = gemm
    quant = []
    for k in ([4096, 11008] if args.quick else [4096, 11008, 14336]):
        for m in ([16384] if args.quick else [2048, 16384]):
            for online in (False, True):
                row = bench_quantizer(m, k, online, bandwidth)
                quant.append(row)
                print(f"quantizer M={m:6d} K={k:6d} online={online!s:5s} {row['ms']:.4f} ms  floor "
                      f"{row['floor_ms']:.4f} ms  x{row['vs_floor']:.2f}"
                      + (f"  (outer {row['outer_factor']} in the kernel)" if row.get("outer_in_kernel") else "")
                      + (f"  (outer {row['outer_factor']} matmul alone {row['outer_matmul_ms']:.4f} ms)"
                         if "outer_matmul_ms" in row else ""), flush=True)
    result["quantizer"] = quant
    if args.quantizer_variants:
        result["quantizer_variants"] = quantizer_variants(bandwidth)
    result["kv"] = bench_kv(8, 32, 2048, 128, bandwidth)
    for row in result["kv"]:
        print(f"kv4 {row['kernel']:18s} {row['shape']} {row['ms']:.4f} ms  x{row['vs_floor']:.2f} of floor", flush=True)
    result["seconds"] = time.time() - started
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_kernels.json").write_text(json.dumps(result, indent=1))
    print("\nGEMM speedup over bf16 (W4A4 / torch F.linear):")
    for model in models:
        print(f"  {model}: " + "  ".join(f"{r['layer']}@{r['m']}:{r['speedup']:.2f}" for r in gemm if r["model"] == model))
    print(f"done in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
