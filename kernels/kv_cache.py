"""KV4: keys (after RoPE and the head Hadamard) and values quantized per token and head into a 4-bit cache,
and the dequantization attention reads back. Same grid as the activation quantizer (quant.KVQuantizer):
asymmetric, range containing 0, codes of (x - bias) with an optional per-head bias."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import as_dtype, asymmetric_code, asymmetric_grid, check_device, interpreting

_ROWS = 256 if interpreting() else 64   # (token, head) rows per program


@triton.jit
def _row_pointers(rows, H, S, stride_b, stride_h, stride_s):
    b = rows // (H * S)
    h = (rows // S) % H
    s = rows % S
    return b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + s.to(tl.int64) * stride_s, h


@triton.jit
def _quantize_kv_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, R, H, S, stride_b, stride_h, stride_s,
                        clip, HAS_BIAS: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < R
    base, head = _row_pointers(rows, H, S, stride_b, stride_h, stride_s)
    pair = tl.arange(0, D // 2)
    even_ptrs = x_ptr + base[:, None] + 2 * pair[None, :]
    even = tl.load(even_ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    odd = tl.load(even_ptrs + 1, mask=ok[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias_ptrs = bias_ptr + head[:, None] * D + 2 * pair[None, :]
        even = as_dtype(even - tl.load(bias_ptrs, mask=ok[:, None], other=0.0).to(tl.float32), DTYPE)
        odd = as_dtype(odd - tl.load(bias_ptrs + 1, mask=ok[:, None], other=0.0).to(tl.float32), DTYPE)
    xmax = tl.maximum(tl.max(even, axis=1), tl.max(odd, axis=1))
    xmin = tl.minimum(tl.min(even, axis=1), tl.min(odd, axis=1))
    scale, zero = asymmetric_grid(xmin, xmax, clip, 15, DTYPE)
    low = asymmetric_code(even, scale[:, None], zero[:, None], 15, DTYPE).to(tl.int32)
    high = asymmetric_code(odd, scale[:, None], zero[:, None], 15, DTYPE).to(tl.int32)
    tl.store(packed_ptr + rows[:, None].to(tl.int64) * (D // 2) + pair[None, :], (low | (high << 4)).to(tl.uint8),
             mask=ok[:, None])
    tl.store(scale_ptr + rows, scale, mask=ok)
    tl.store(zero_ptr + rows, zero, mask=ok)


@triton.jit
def _dequantize_kv_kernel(packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, R, H, S,
                          HAS_BIAS: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr):
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < R
    head = (rows // S) % H
    pair = tl.arange(0, D // 2)
    byte = tl.load(packed_ptr + rows[:, None].to(tl.int64) * (D // 2) + pair[None, :], mask=ok[:, None], other=0)
    byte = byte.to(tl.int32)
    scale = tl.load(scale_ptr + rows, mask=ok, other=0.0)[:, None]
    zero = tl.load(zero_ptr + rows, mask=ok, other=0.0)[:, None]
    even = as_dtype(((byte & 15).to(tl.float32) - zero) * scale, DTYPE)
    odd = as_dtype(((byte >> 4).to(tl.float32) - zero) * scale, DTYPE)
    if HAS_BIAS:
        bias_ptrs = bias_ptr + head[:, None] * D + 2 * pair[None, :]
        even += tl.load(bias_ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
        odd += tl.load(bias_ptrs + 1, mask=ok[:, None], other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * D + 2 * pair[None, :]
    tl.store(out_ptrs, even.to(DTYPE), mask=ok[:, None])
    tl.store(out_ptrs + 1, odd.to(DTYPE), mask=ok[:, None])


def _check_head_dim(d: int) -> None:
    if d < 2 or d & (d - 1):
        raise ValueError(f"KV4 kernels need a power-of-two head_dim, got {d}")


def quantize_kv(x: torch.Tensor, clip: float = 1.0, bias: torch.Tensor | None = None):
    """x [B, H, S, D] (any strides, D contiguous) -> (packed uint8 [B, H, S, D/2], scale fp32 [B, H, S],
    zero fp32 [B, H, S]). bias: [H, D] in x's dtype, subtracted before quantization."""
    check_device(x)
    b, h, s, d = x.shape
    _check_head_dim(d)
    if x.stride(3) != 1:
        x = x.contiguous()
    packed = torch.empty(b, h, s, d // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(b, h, s, dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    rows = b * h * s
    clip = float(torch.tensor(float(clip)).to(x.dtype))
    _quantize_kv_kernel[(triton.cdiv(rows, _ROWS),)](
        x, packed, scale, zero, bias if bias is not None else x, rows, h, s, x.stride(0), x.stride(1), x.stride(2),
        clip, HAS_BIAS=bias is not None, D=d, ROWS=_ROWS)
    return packed, scale, zero


def dequantize_kv(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """The cache back to [B, H, S, D] values (q - zero) * scale + bias, rounded as the fake quantizer does."""
    check_device(packed)
    b, h, s, half = packed.shape
    out = torch.empty(b, h, s, 2 * half, dtype=dtype, device=packed.device)
    rows = b * h * s
    _dequantize_kv_kernel[(triton.cdiv(rows, _ROWS),)](
        packed, scale, zero, bias if bias is not None else out, out, rows, h, s,
        HAS_BIAS=bias is not None, D=2 * half, ROWS=_ROWS)
    return out


__all__ = ["quantize_kv", "dequantize_kv"]
