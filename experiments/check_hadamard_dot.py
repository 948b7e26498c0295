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
from baseq_kernels import quantize_activations
from baseq.hadamard import kronecker_factors, hadamard_transform
from baseq.quant import asymmetric_codes
torch.manual_seed(0)
k=4096; dt=torch.bfloat16
x=(torch.randn(64,k, device="cuda")*3).to(dt)
o,i=kronecker_factors(k)
hp=(o.to("cuda", dt), i.to("cuda", dt), k)
rot = hadamard_transform(x)
rc, rs, rz = asymmetric_codes(rot, 4, torch.tensor(0.9, dtype=dt))
for native in ("native", "tf32", "ieee"):
    c, s, off = quantize_activations(x, 0.9, None, None, hp, hadamard_precision=native)
    print(native, (s / rs[:, 0].float() - 1).abs().max().item(), s[:4].tolist(), rs[:4, 0].tolist())
from triton.testing import do_bench
for kk in (4096, 11008):
    x = torch.randn(16384, kk, device="cuda", dtype=dt)
    o, i = kronecker_factors(kk)
    hp = (None if o is None else o.to("cuda", dt), i.to("cuda", dt), kk)
    for prec in ("native", "ieee"):
        print(kk, prec, do_bench(lambda: quantize_activations(x, 1.0, None, None, hp, hadamard_precision=prec), return_mode="median"))
