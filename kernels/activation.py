"""Fused activation quantizer: x -> (optional Hadamard) -> x - B -> * S -> per-token asymmetric 4-bit codes.

One program holds BLOCK_M whole rows in registers, so x is read once and the codes written once. The
Hadamard's inner factor (a Sylvester block of at most 128, applied to each contiguous block of that size)
runs inside the kernel as a tensor-core dot; a larger outer factor (e.g. the 172 of 11008 = 172 * 64) is
one batched matmul before the kernel (see `quantize_activations`)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import PACK_GROUP, as_dtype, asymmetric_code, asymmetric_grid, check_device, interpreting

# Row tile (BLOCK_M * BLOCK_K values) a program holds. One config per shape instead of autotuning: larger
# tiles gain nothing on a memory-bound pass, and with the in-kernel Hadamard dot they compile for minutes.
_TILE = 8192


def _launch_config(block_k: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps): at least one whole row; about 1K values per warp."""
    if interpreting():
        return max(1, 4 * _TILE // block_k), 4
    block_m = max(1, _TILE // block_k)
    return block_m, min(16, max(4, block_m * block_k // 1024))


@triton.jit
def _quantize_activation_kernel(
    x_ptr, codes_ptr, scale_ptr, offset_ptr, bias_ptr, mult_ptr, had_ptr,
    M, K, KP, stride_xm, stride_cm, clip, had_norm,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, SEGMENT: tl.constexpr,
):
    """BLOCK_M rows, each held as BLOCK_K // SEGMENT segments of SEGMENT columns (one segment per row without
    a Hadamard; the Hadamard's block size with one). The tile is loaded in its [segments, SEGMENT] shape, so
    the Hadamard is a plain dot on it: reshaping a row tile into that shape instead made the tensor-core dot
    sum wrongly on the H100 (Triton 3.6; experiments/check_hadamard_dot.py)."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    PER_ROW: tl.constexpr = BLOCK_K // SEGMENT
    segment = tl.arange(0, BLOCK_M * PER_ROW)
    rows = tl.program_id(0) * BLOCK_M + segment // PER_ROW
    cols = (segment % PER_ROW)[:, None] * SEGMENT + tl.arange(0, SEGMENT)[None, :]
    row_ok = rows < M
    col_ok = cols < K
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols, mask=row_ok[:, None] & col_ok, other=0.0)
    if HAD > 0:
        h = tl.load(had_ptr + tl.arange(0, HAD)[:, None] * HAD + tl.arange(0, HAD)[None, :])
        if DOT_PRECISION == "ieee":
            x, h = x.to(tl.float32), h.to(tl.float32)
        rotated = tl.dot(x, h, out_dtype=tl.float32) if DOT_PRECISION == "native" else \
            tl.dot(x, h, input_precision=DOT_PRECISION, out_dtype=tl.float32)
        # the reference transform computes in fp32 and returns the input's dtype
        x = as_dtype(rotated * had_norm, DTYPE)
    else:
        x = x.to(tl.float32)
    if HAS_BIAS:
        x = as_dtype(x - tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32), DTYPE)
    if HAS_SCALE:
        x = as_dtype(x * tl.load(mult_ptr + cols, mask=col_ok, other=0.0).to(tl.float32), DTYPE)
    seg_max = tl.max(tl.where(col_ok, x, float("-inf")), axis=1)
    seg_min = tl.min(tl.where(col_ok, x, float("inf")), axis=1)
    xmax = tl.max(tl.reshape(seg_max, (BLOCK_M, PER_ROW)), axis=1)
    xmin = tl.min(tl.reshape(seg_min, (BLOCK_M, PER_ROW)), axis=1)
    scale, zero = asymmetric_grid(xmin, xmax, clip, 15, DTYPE)
    seg_scale = tl.reshape(tl.broadcast_to(scale[:, None], (BLOCK_M, PER_ROW)), (BLOCK_M * PER_ROW,))
    seg_zero = tl.reshape(tl.broadcast_to(zero[:, None], (BLOCK_M, PER_ROW)), (BLOCK_M * PER_ROW,))
    codes = asymmetric_code(x, seg_scale[:, None], seg_zero[:, None], 15, DTYPE) - 8.0
    codes = tl.where(col_ok, codes, 0.0)
    tl.store(codes_ptr + rows[:, None].to(tl.int64) * stride_cm + cols, codes.to(tl.int8),
             mask=row_ok[:, None] & (cols < KP))
    token = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(scale_ptr + token, scale, mask=token < M)
    tl.store(offset_ptr + token, scale * (8.0 - zero), mask=token < M)


def quantize_activations(x: torch.Tensor, clip: float = 1.0, bias: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None, hadamard: tuple | None = None,
                         hadamard_precision: str | None = None):
    """Per-token asymmetric 4-bit quantization of x [M, K] after an optional Hadamard, bias and scale.

    hadamard: (outer, inner, n) with kron(outer, inner) = H_n unnormalized (+-1 entries, in x's dtype and
    on its device; outer may be None; inner at most 128), or None. Each contiguous block of n columns is
    transformed, x_block @ kron(outer, inner) / sqrt(n): n = K is the full transform (down_proj's R4),
    n = head_dim a head-wise one.
    hadamard_precision: the in-kernel dot: "native" (tensor cores on the input dtype; the default for
    bf16/fp16), "tf32", or "ieee" (FMA in fp32; the default for fp32 inputs).
    Returns (codes int8 [M, Kp], scale fp32 [M], offset fp32 [M]); see the package docstring.
    """
    check_device(x)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_activations needs a row-major [M, K] tensor, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    m, k = x.shape
    had_size, had_norm, inner = 0, 1.0, x  # x is a placeholder pointer when there is no Hadamard
    if hadamard is not None:
        outer, inner, n = hadamard
        if k % n or (outer.shape[0] if outer is not None else 1) * inner.shape[0] != n:
            raise ValueError(f"Hadamard factors {None if outer is None else outer.shape[0]} x {inner.shape[0]} do "
                             f"not make blocks of {n} that tile rows of {k}")
        if outer is not None:
            # y[t, p, q] = sum_i outer[i, p] x[t, i, q] over every block t: one batched matmul
            x = torch.matmul(outer.T, x.view(m * (k // n), outer.shape[0], -1)).view(m, k)
        had_size, had_norm = inner.shape[0], 1.0 / math.sqrt(n)
    kp = -(-k // PACK_GROUP) * PACK_GROUP
    codes = torch.empty(m, kp, dtype=torch.int8, device=x.device)
    tok_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    tok_offset = torch.empty(m, dtype=torch.float32, device=x.device)
    # the clip the reference multiplies by is a tensor of the model's dtype
    clip = float(torch.tensor(float(clip)).to(x.dtype))
    # bf16/fp16 values and +-1 are exact as tensor-core operands; fp32 ones are not exact in tf32
    precision = hadamard_precision or ("ieee" if x.dtype == torch.float32 else "native")
    block_k = triton.next_power_of_2(kp)
    block_m, warps = _launch_config(block_k)
    _quantize_activation_kernel[(triton.cdiv(m, block_m),)](
        x, codes, tok_scale, tok_offset,
        bias if bias is not None else x, scale if scale is not None else x, inner,
        m, k, kp, x.stride(0), codes.stride(0), clip, had_norm,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAD=had_size, DOT_PRECISION=precision,
        BLOCK_K=block_k, BLOCK_M=block_m, SEGMENT=had_size or block_k, num_warps=warps)
    return codes, tok_scale, tok_offset


__all__ = ["quantize_activations"]
