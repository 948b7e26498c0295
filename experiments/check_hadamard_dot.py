"""Evidence for the fused quantizer's Hadamard dot precision (one GPU call, about 30 s):

  python experiments/check_hadamard_dot.py

For bf16 input with K=4096 (outer 32 before the kernel, inner 128 in it), prints the largest relative
difference of the kernel's token scales from the fake quantizer's, with the in-kernel dot run as "tf32"
(tensor cores), "native" (bf16 tensor cores) and "ieee" (FMA), then the time of "native" and "ieee" at
M=16384 for K=4096 and 11008.
H100, 2026-11-22, with the row tile reshaped into the dot's shape (the first kernel): native 0.237 and
tf32 0.227 (wrong sums), ieee 0.013 (the two-stage bf16 rounding); tf32 0.58 / 1.96 ms, ieee 14.0 / 18.7 ms.
The kernel now loads the tile in the dot's shape; see docs/kernels.md for the numbers after that change.
"""

import torch
from triton.testing import do_bench

from baseq.hadamard import hadamard_transform, kronecker_factors
from baseq.quant import asymmetric_codes
from baseq_kernels import quantize_activations

DTYPE = torch.bfloat16


def hadamard_factors(k: int):
    outer, inner = kronecker_factors(k)
    return None if outer is None else outer.to("cuda", DTYPE), inner.to("cuda", DTYPE), k


def main() -> None:
    torch.manual_seed(0)
    k = 4096
    x = (torch.randn(64, k, device="cuda") * 3).to(DTYPE)
    _, ref_scale, _ = asymmetric_codes(hadamard_transform(x), 4, torch.tensor(0.9, dtype=DTYPE))
    for precision in ("native", "tf32", "ieee"):
        _, scale, _ = quantize_activations(x, 0.9, None, None, hadamard_factors(k), hadamard_precision=precision)
        print(precision, "max relative scale difference", (scale / ref_scale[:, 0].float() - 1).abs().max().item())
    for k in (4096, 11008):
        x = torch.randn(16384, k, device="cuda", dtype=DTYPE)
        factors = hadamard_factors(k)
        for precision in ("native", "ieee"):
            ms = do_bench(lambda: quantize_activations(x, 1.0, None, None, factors, hadamard_precision=precision),
                          return_mode="median")
            print(f"M=16384 K={k} {precision}: {ms:.3f} ms")


if __name__ == "__main__":
    main()
