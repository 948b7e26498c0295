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
def _quantize_kv_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, R, H, S, stride_b, stride_h,
                        stride_s, clip, HAS_BIAS: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                        ROUND_TRIP: tl.constexpr):
    """Codes of ROWS (token, head) rows into the packed cache, or with ROUND_TRIP their dequantized values
    (what attention reads back from the cache) into out_ptr, without storing the codes. Rows are read and
    written whole; even and odd elements are split in registers."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < R
    base, head = _row_pointers(rows, H, S, stride_b, stride_h, stride_s)
    col = tl.arange(0, D)
    x = tl.load(x_ptr + base[:, None] + col[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head[:, None] * D + col[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        x = as_dtype(x - bias, DTYPE)
    scale, zero = asymmetric_grid(tl.min(x, axis=1), tl.max(x, axis=1), clip, 15, DTYPE)
    codes = asymmetric_code(x, scale[:, None], zero[:, None], 15, DTYPE)
    if ROUND_TRIP:
        values = as_dtype((codes - zero[:, None]) * scale[:, None], DTYPE)
        if HAS_BIAS:
            values += bias
        tl.store(out_ptr + rows[:, None].to(tl.int64) * D + col[None, :], values.to(DTYPE), mask=ok[:, None])
    else:
        low, high = tl.split(tl.reshape(codes.to(tl.int32), (ROWS, D // 2, 2)))
        pair = tl.arange(0, D // 2)
        tl.store(packed_ptr + rows[:, None].to(tl.int64) * (D // 2) + pair[None, :],
                 (low | (high << 4)).to(tl.uint8), mask=ok[:, None])
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
    codes = tl.reshape(tl.join(byte & 15, byte >> 4), (ROWS, D)).to(tl.float32)   # even index = low nibble
    scale = tl.load(scale_ptr + rows, mask=ok, other=0.0)[:, None]
    zero = tl.load(zero_ptr + rows, mask=ok, other=0.0)[:, None]
    values = as_dtype((codes - zero) * scale, DTYPE)
    col = tl.arange(0, D)
    if HAS_BIAS:
        values += tl.load(bias_ptr + head[:, None] * D + col[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + col[None, :], values.to(DTYPE), mask=ok[:, None])


def _check_head_dim(d: int) -> None:
    if d < 2 or d & (d - 1):
        raise ValueError(f"KV4 kernels need a power-of-two head_dim, got {d}")


def _launch_quantize_kv(x: torch.Tensor, clip: float, bias: torch.Tensor | None, round_trip: bool):
    check_device(x)
    b, h, s, d = x.shape
    _check_head_dim(d)
    if x.stride(3) != 1:
        x = x.contiguous()
    rows = b * h * s
    if round_trip:
        out = torch.empty(b, h, s, d, dtype=x.dtype, device=x.device)
        packed = scale = zero = out   # not written
    else:
        out = x   # not written
        packed = torch.empty(b, h, s, d // 2, dtype=torch.uint8, device=x.device)
        scale = torch.empty(b, h, s, dtype=torch.float32, device=x.device)
        zero = torch.empty_like(scale)
    clip = float(torch.tensor(float(clip)).to(x.dtype))
    _quantize_kv_kernel[(triton.cdiv(rows, _ROWS),)](
        x, packed, scale, zero, bias if bias is not None else x, out, rows, h, s, x.stride(0), x.stride(1),
        x.stride(2), clip, HAS_BIAS=bias is not None, D=d, ROWS=_ROWS, ROUND_TRIP=round_trip)
    return out if round_trip else (packed, scale, zero)


def quantize_kv(x: torch.Tensor, clip: float = 1.0, bias: torch.Tensor | None = None):
    """x [B, H, S, D] (any strides, D contiguous) -> (packed uint8 [B, H, S, D/2], scale fp32 [B, H, S],
    zero fp32 [B, H, S]). bias: [H, D] in x's dtype, subtracted before quantization."""
    return _launch_quantize_kv(x, clip, bias, round_trip=False)


def kv_cache_round_trip(x: torch.Tensor, clip: float = 1.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize_kv(*quantize_kv(x, clip, bias), x.dtype, bias) in one pass: the values attention reads
    back from the 4-bit cache, contiguous [B, H, S, D], without materializing the codes (prefill and
    perplexity evaluation, where no cache is kept)."""
    return _launch_quantize_kv(x, clip, bias, round_trip=True)


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


__all__ = ["quantize_kv", "dequantize_kv", "kv_cache_round_trip"]
