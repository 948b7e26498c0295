"""KV4: keys (after RoPE and the head Hadamard) and values quantized per token and head into a 4-bit cache,
and the dequantization attention reads back. Same grid as the activation quantizer (quant.KVQuantizer):
asymmetric, range containing 0, codes of (x - bias) with an optional per-head bias.

The head Hadamard (R3) can run inside these kernels: a (token, head) row is loaded as a [rows, head_dim]
tile, which is the shape of the dot with H, so keys are rotated, quantized and dequantized in one pass and
queries rotated in one pass (`rotate_heads`), instead of a matmul that first copies HF's strided view."""

from __future__ import annotations

import math

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
def _kv_pass_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr, had_ptr, R, H, S, stride_b, stride_h,
                    stride_s, clip, clip_ptr, had_norm, HAS_BIAS: tl.constexpr, PER_HEAD_CLIP: tl.constexpr,
                    D: tl.constexpr, ROWS: tl.constexpr,
                    MODE: tl.constexpr, ROTATE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """ROWS (token, head) rows, read whole, optionally rotated by the head Hadamard first (ROTATE), then by MODE:
    "codes" writes the packed cache, "round_trip" the dequantized values attention reads back from it
    (without storing codes), "rotate" only the rotated values. Outputs are contiguous [B, H, S, ...]."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < R
    base, head = _row_pointers(rows, H, S, stride_b, stride_h, stride_s)
    col = tl.arange(0, D)
    x = tl.load(x_ptr + base[:, None] + col[None, :], mask=ok[:, None], other=0.0)
    if ROTATE:
        h = tl.load(had_ptr + col[:, None] * D + col[None, :])
        if DOT_PRECISION == "ieee":
            rotated = tl.dot(x.to(tl.float32), h.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
        else:
            rotated = tl.dot(x, h, out_dtype=tl.float32)
        # as hadamard_transform: the +-1 product summed in fp32, scaled, rounded to the input dtype
        x = as_dtype(rotated * had_norm, DTYPE)
    else:
        x = x.to(tl.float32)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * D + col[None, :]
    if MODE == "rotate":
        tl.store(out_ptrs, x.to(DTYPE), mask=ok[:, None])
    else:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + head[:, None] * D + col[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            x = as_dtype(x - bias, DTYPE)
        if PER_HEAD_CLIP:
            clip = tl.load(clip_ptr + head, mask=ok, other=1.0)
        scale, zero = asymmetric_grid(tl.min(x, axis=1), tl.max(x, axis=1), clip, 15, DTYPE)
        codes = asymmetric_code(x, scale[:, None], zero[:, None], 15, DTYPE)
        if MODE == "round_trip":
            values = as_dtype((codes - zero[:, None]) * scale[:, None], DTYPE)
            if HAS_BIAS:
                values += bias
            tl.store(out_ptrs, values.to(DTYPE), mask=ok[:, None])
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


def _clip_args(clip: float | torch.Tensor, heads: int, x: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """(scalar clip, per-head clips or None) for the kernel. A scalar is rounded to x's dtype here, on the
    host, as the fake quantizer applies it (no device work); a per-head tensor [heads] (or [heads, 1, 1])
    must hold values of x's dtype already, as quant.effective_clip(module, x.dtype) gives them."""
    if not isinstance(clip, torch.Tensor) or clip.numel() == 1:
        return float(torch.tensor(float(clip)).to(x.dtype)), None
    if clip.numel() != heads:
        raise ValueError(f"KV clip needs one value or one per head ({heads}), got {clip.numel()}")
    return 1.0, clip.reshape(heads).to(device=x.device, dtype=torch.float32).contiguous()


def _kv_pass(x: torch.Tensor, mode: str, clip: float | torch.Tensor = 1.0, bias: torch.Tensor | None = None,
             hadamard: torch.Tensor | None = None):
    check_device(x)
    b, h, s, d = x.shape
    _check_head_dim(d)
    if hadamard is not None and (hadamard.shape != (d, d) or hadamard.dtype != x.dtype):
        raise ValueError(f"the head Hadamard must be a +-1 [{d}, {d}] matrix in {x.dtype}, got "
                         f"{tuple(hadamard.shape)} {hadamard.dtype}")
    if x.stride(3) != 1:
        x = x.contiguous()
    rows = b * h * s
    out = packed = scale = zero = x   # placeholders for the outputs a mode does not write
    if mode == "codes":
        packed = torch.empty(b, h, s, d // 2, dtype=torch.uint8, device=x.device)
        scale = torch.empty(b, h, s, dtype=torch.float32, device=x.device)
        zero = torch.empty_like(scale)
    else:
        out = torch.empty(b, h, s, d, dtype=x.dtype, device=x.device)
    scalar_clip, head_clips = _clip_args(clip, h, x)
    _kv_pass_kernel[(triton.cdiv(rows, _ROWS),)](
        x, packed, scale, zero, bias if bias is not None else x, out, hadamard if hadamard is not None else x,
        rows, h, s, x.stride(0), x.stride(1), x.stride(2), scalar_clip, head_clips if head_clips is not None else x,
        1.0 / math.sqrt(d),   # as hadamard_transform
        HAS_BIAS=bias is not None, PER_HEAD_CLIP=head_clips is not None, D=d, ROWS=_ROWS, MODE=mode, ROTATE=hadamard is not None,
        # bf16/fp16 values and +-1 are exact tensor-core operands; fp32 ones are not exact in tf32
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "native")
    return (packed, scale, zero) if mode == "codes" else out


def quantize_kv(x: torch.Tensor, clip: float | torch.Tensor = 1.0, bias: torch.Tensor | None = None,
                hadamard: torch.Tensor | None = None):
    """x [B, H, S, D] (any strides, D contiguous) -> (packed uint8 [B, H, S, D/2], scale fp32 [B, H, S],
    zero fp32 [B, H, S]). bias: [H, D] in x's dtype, subtracted before quantization. hadamard: the +-1
    Sylvester H_D in x's dtype, to quantize x @ H_D / sqrt(D) (R3 on keys), or None."""
    return _kv_pass(x, "codes", clip, bias, hadamard)


def kv_cache_round_trip(x: torch.Tensor, clip: float | torch.Tensor = 1.0, bias: torch.Tensor | None = None,
                        hadamard: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize_kv(*quantize_kv(x, clip, bias, hadamard), x.dtype, bias) in one pass: the values attention
    reads back from the 4-bit cache, contiguous [B, H, S, D], without materializing the codes (prefill and
    perplexity evaluation, where no cache is kept)."""
    return _kv_pass(x, "round_trip", clip, bias, hadamard)


def rotate_heads(x: torch.Tensor, hadamard: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] (any strides, D contiguous) @ H_D / sqrt(D) as a contiguous tensor, in one pass: R3 on
    queries, rounded as hadamard_transform rounds it."""
    return _kv_pass(x, "rotate", hadamard=hadamard)


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


__all__ = ["quantize_kv", "dequantize_kv", "kv_cache_round_trip", "rotate_heads"]
