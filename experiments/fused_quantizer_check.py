"""The fake quantizers eager against compiled (quant.fused_inference) on a GPU: are the values bit-identical,
and how long does one call take? For each kind of quantizer (QuaRot's plain per-token one, BASE-Q's with scale,
bias and a learned clip, the per-head KV one) and dtype, on activations of a 135M and a 0.5B model's widths.
Writes a JSON with the command, device, date and, per case, the share of values that differ, the largest
difference, and microseconds per call (no autograd, after warm-up).

    python experiments/fused_quantizer_check.py --out results/bench/fused_quantizers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from baseq.quant import ActivationQuantizer, KVQuantizer, fused_inference
from baseq.records import git_commit, package_versions


def quantizers(dim: int, heads: int, head_dim: int, device):
    torch.manual_seed(0)
    baseq = ActivationQuantizer(dim, 4, 0.9, learn_clip=True)
    baseq.add_bias(torch.randn(dim))
    baseq.add_scale()
    with torch.no_grad():
        baseq.scale.uniform_(0.5, 1.5)
    kv = KVQuantizer(4, 0.95, learn_clip=True, heads=heads)
    kv.add_bias(torch.randn(heads, head_dim))
    return {"quarot_activation": ActivationQuantizer(dim, 4, 0.9).to(device), "baseq_activation": baseq.to(device),
            "kv_per_head": kv.to(device)}


def per_call_us(fn, x, repeats: int) -> float:
    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    device = torch.device("cuda")
    cases = []
    with torch.no_grad():
        for width, heads, head_dim, tokens in ((576, 3, 64, (64, 128)), (896, 2, 64, (64, 128)), (896, 2, 64, (8, 2048))):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for kind, q in quantizers(width, heads, head_dim, device).items():
                    shape = (tokens[0], heads, tokens[1], head_dim) if kind == "kv_per_head" else (*tokens, width)
                    x = (torch.randn(shape, device=device) * 3).to(dtype)
                    with fused_inference(False):
                        eager = q(x)
                        eager_us = per_call_us(q, x, args.repeats)
                    with fused_inference(True):
                        fused = q(x)
                        fused_us = per_call_us(q, x, args.repeats)
                    differ = (eager != fused)
                    case = {"kind": kind, "dtype": str(dtype).removeprefix("torch."), "shape": list(shape),
                            "differing_fraction": differ.float().mean().item(),
                            "max_abs_difference": (eager.float() - fused.float()).abs().max().item(),
                            "eager_us_per_call": eager_us, "fused_us_per_call": fused_us}
                    cases.append(case)
                    print(json.dumps(case), flush=True)
    out = {"command": " ".join([sys.executable, *sys.argv]), "date": datetime.now(timezone.utc).isoformat(),
           "device": torch.cuda.get_device_name(device), "versions": package_versions(), "git_commit": git_commit(),
           "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
