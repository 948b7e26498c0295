"""Where a decode-size W4A4 GEMM call's time goes (one GPU call, about a minute).

  python experiments/decode_breakdown.py [--m 16] [--out DIR]

At Llama-2-7B shapes, each timed as CUDA-graph replays cycling over weight copies totalling more than 256 MiB
(so no weight is read from L2), per call:
  full         w4a4_matmul as the runtime calls it: zero the fp32 output, split-K kernel, cast to bf16;
  zero, cast   those two launches alone;
  kernel       full - zero - cast;
  one launch   the same kernel with SPLIT_K=1 writing bf16 directly (no zeroing, no cast), the best of a few
               configs: fewer programs (N / 64), each reading a whole row block of the weight;
  floor        the bytes the kernel must read (packed weight, codes, scales) over the measured read bandwidth;
  bf16         torch F.linear on the bf16 weight.
Prints a table and writes DIR/decode_breakdown.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from baseq_kernels import PACK_GROUP, pack_int4, quantize_activations, w4a4_matmul
from baseq_kernels.gemm import _w4a4_kernel

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
L2_OVERFLOW_BYTES = 256 << 20
# (GROUPS_PER_STEP, num_warps, num_stages) tried for the one-launch variant
ONE_LAUNCH_CONFIGS = [(1, 4, 4), (2, 4, 4), (4, 4, 3), (2, 4, 6)]


def graph_us(calls) -> float:
    """Median microseconds per call of a list of calls replayed as one CUDA graph."""
    return do_bench_cudagraph(lambda: [c() for c in calls], rep=100, return_mode="median") * 1e3 / len(calls)


def read_bandwidth() -> float:
    x = torch.randn(512 << 20, device="cuda", dtype=torch.bfloat16)   # 1 GiB
    ms = do_bench(lambda: x.sum(), warmup=10, rep=100, return_mode="median")
    return x.numel() * 2 / (ms * 1e-3)


def breakdown(m: int, n: int, k: int, bandwidth: float) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    codes_w = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
    w_scale = torch.rand(n, device="cuda") * 0.01 + 0.001
    w_sum = codes_w.float().sum(1)
    xq, xs, xo = quantize_activations(x)
    packs = [pack_int4(codes_w)]
    packs += [packs[0].clone() for _ in range(max(1, math.ceil(L2_OVERFLOW_BYTES / packs[0].numel())) - 1)]
    w_bf16 = codes_w.to(torch.bfloat16) * w_scale[:, None].to(torch.bfloat16)
    bf16_ws = [w_bf16] + [w_bf16.clone() for _ in range(max(1, math.ceil(L2_OVERFLOW_BYTES / (2 * n * k))) - 1)]
    full = graph_us([lambda p=p: w4a4_matmul(xq, xs, xo, p, w_scale, w_sum) for p in packs])
    zero = graph_us([lambda: torch.zeros(m, n, dtype=torch.float32, device="cuda")] * len(packs))
    partial = torch.zeros(m, n, dtype=torch.float32, device="cuda")
    cast = graph_us([lambda: partial.to(torch.bfloat16)] * len(packs))
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    one_launch = {}
    k_groups = xq.shape[1] // PACK_GROUP
    for groups, warps, stages in [c for c in ONE_LAUNCH_CONFIGS if k_groups % c[0] == 0]:
        def call(p, g=groups, w=warps, s=stages):
            _w4a4_kernel[(triton.cdiv(n, 64) * triton.cdiv(m, 16), 1)](
                xq, p, out, xs, xo, w_scale, w_sum, w_scale, m, n, k_groups, xq.stride(0),
                p.stride(0), out.stride(0), 16, HAS_BIAS=False, BLOCK_N=64, BLOCK_M=16, GROUPS_PER_STEP=g,
                SPLIT_K=1, num_warps=w, num_stages=s)
        one_launch[f"g{groups} w{warps} s{stages}"] = graph_us([lambda p=p: call(p) for p in packs])
    best = min(one_launch, key=one_launch.get)
    floor_bytes = n * xq.shape[1] // 2 + m * xq.shape[1] + 8 * n + 8 * m
    bf16 = graph_us([lambda w=w: F.linear(x, w) for w in bf16_ws])
    return {"m": m, "n": n, "k": k, "bf16_us": bf16, "full_us": full, "zero_us": zero, "cast_us": cast,
            "kernel_us": full - zero - cast, "one_launch_us": one_launch[best], "one_launch_config": best,
            "one_launch_all_us": one_launch, "floor_us": floor_bytes / bandwidth * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth = read_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "date": datetime.now(timezone.utc).isoformat(),
              "torch": torch.__version__, "triton": triton.__version__, "command": "python " + " ".join(sys.argv),
              "read_bandwidth_tbs": bandwidth / 1e12, "rows": []}
    print(f"{result['device']}: read bandwidth {bandwidth / 1e12:.2f} TB/s; M={args.m}; microseconds per call")
    print(f"{'layer':8s}{'bf16':>8s}{'full':>8s}{'zero':>7s}{'cast':>7s}{'kernel':>8s}{'1 launch':>10s}{'floor':>7s}"
          f"{'bf16/full':>11s}{'bf16/kernel':>12s}{'bf16/1 launch':>14s}")
    for name, (n, k) in SHAPES.items():
        r = {"layer": name, **breakdown(args.m, n, k, bandwidth)}
        result["rows"].append(r)
        print(f"{name:8s}{r['bf16_us']:8.1f}{r['full_us']:8.1f}{r['zero_us']:7.1f}{r['cast_us']:7.1f}"
              f"{r['kernel_us']:8.1f}{r['one_launch_us']:10.1f}{r['floor_us']:7.1f}{r['bf16_us'] / r['full_us']:11.2f}"
              f"{r['bf16_us'] / r['kernel_us']:12.2f}{r['bf16_us'] / r['one_launch_us']:14.2f}  {r['one_launch_config']}",
              flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_breakdown.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
