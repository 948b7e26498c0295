"""Pieces every kernel file uses."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# K values per packed weight group (see the package docstring); also the K padding of activation codes.
PACK_GROUP = 128

# Adding then subtracting 1.5 * 2^23 rounds an fp32 |x| < 2^22 to the nearest integer, ties to even, which
# is torch.round's rule; libdevice.rint would do the same on the GPU but does not exist in the interpreter.
_ROUND_MAGIC = tl.constexpr(12582912.0)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not interpreting():
            raise RuntimeError(f"the Triton kernels need CUDA tensors (got one on {t.device}); "
                               f"set TRITON_INTERPRET=1 to run them on the CPU for testing")


@triton.jit
def round_half_even(x):
    return (x + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def as_dtype(x, DTYPE: tl.constexpr):
    """Round an fp32 value to DTYPE and back: the rounding torch applies after each op on DTYPE tensors,
    so a kernel computing in fp32 reproduces the fake quantizer run in the model's dtype."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def asymmetric_grid(xmin, xmax, clip, LEVELS: tl.constexpr, DTYPE: tl.constexpr):
    """Scale and zero point of quant._asymmetric_grid, op by op in DTYPE: the range always contains 0."""
    hi = as_dtype(tl.maximum(xmax, 0.0) * clip, DTYPE)
    lo = as_dtype(tl.minimum(xmin, 0.0) * clip, DTYPE)
    scale = as_dtype(tl.math.div_rn(as_dtype(hi - lo, DTYPE), tl.full(hi.shape, LEVELS, tl.float32)), DTYPE)
    scale = tl.maximum(scale, as_dtype(tl.full(scale.shape, 1e-8, tl.float32), DTYPE))
    zero = round_half_even(as_dtype(tl.math.div_rn(-lo, scale), DTYPE))
    return scale, zero


@triton.jit
def asymmetric_code(x, scale, zero, LEVELS: tl.constexpr, DTYPE: tl.constexpr):
    """clamp(round(x / scale) + zero, 0, LEVELS), as quant.asymmetric_codes computes it in DTYPE."""
    q = round_half_even(as_dtype(tl.math.div_rn(x, scale), DTYPE)) + zero
    return tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0)

