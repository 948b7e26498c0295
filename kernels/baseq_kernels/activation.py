"""Fused activation quantizer: x -> (optional Hadamard) -> S^a x - B (Eq. 15) -> per-token asymmetric 4-bit codes.

Rows are loaded as [segments, SEGMENT] tiles, SEGMENT being the Hadamard's inner factor (a Sylvester block of
at most 128), so both Hadamard factors are plain tensor-core dots on the tile: the outer factor (e.g. the 172
of 11008 = 172 * 64) mixes the segments from the left, the inner one mixes each segment from the right.
A row whose outer factor runs in the kernel is held whole (the factor mixes all of it); so are rows up to
SINGLE_PASS_MAX_K. Those are read once. Longer rows are read twice in chunks: min/max, then codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .common import PACK_GROUP, as_dtype, asymmetric_code, asymmetric_grid, check_device, interpreting

# Single pass (rows held whole in registers) up to this padded row length; longer rows without an in-kernel
# outer factor take two passes over chunks of CHUNK_VALUES: min/max first, then the codes, re-reading the
# row (from L2) instead of holding it, which keeps registers low enough for several programs per SM.
SINGLE_PASS_MAX_K = 4096
CHUNK_VALUES = 2048
# Row tile (BLOCK_M * padded K values) of a single-pass program.
_TILE = 8192
# Largest (padded) outer factor run inside the kernel, by activation dtype: a resident one sits in shared
# memory (256^2 bf16 = 128 KiB) for all the rows a program handles.
_MAX_FUSED_OUTER = {torch.float32: 64, torch.float16: 256, torch.bfloat16: 256}
# Rows whose segments need no padding (e.g. 4096 = 32 x 128) are stacked into one tile of about this many
# values, with a block-diagonal left factor of at most _MAX_FUSED_OUTER_MULTIROW.
FUSED_OUTER_TILE = 8192
_MAX_FUSED_OUTER_MULTIROW = 128
# On the GPU a fused left factor of at least this (padded) size is loaded once per program, and
# RESIDENT_OUTER_PROGRAMS_PER_SM programs per SM loop over the row groups, the loop software-pipelined
# RESIDENT_OUTER_STAGES deep (3 overflows the shared memory with a 256 factor); smaller ones are re-read
# (from L2) by one program per row group. H100, M=16384, K=4096 (left 64): 0.209 ms resident with 8 warps
# and 2 programs per SM, 0.25 ms one program per row group (experiments/bench_kernels.py --quantizer-variants).
RESIDENT_OUTER_MIN = 16
RESIDENT_OUTER_STAGES = 2
RESIDENT_OUTER_WARPS = 8   # at least; 1K values per warp
RESIDENT_OUTER_PROGRAMS_PER_SM = 2
# Launch of the split-tile kernel (left_split), e.g. the 172 = 128 + 64 outer factor of 11008: the factor
# takes 72 KiB of shared memory and about 200 regs/thread at 8 warps (sm_90): one program per SM, whose row
# loop is pipelined 3 deep. H100, M=16384 (docs/kernels.md): 1.07-1.08 ms; 16 warps 1.20-1.24 ms (1.29-1.31
# at 2 stages, 1.49 at 1); 2 rows per step spills (1.43 ms).
SPLIT_OUTER_PROGRAMS_PER_SM = 1
SPLIT_OUTER_WARPS = 8
SPLIT_OUTER_STAGES = 3


@dataclass(frozen=True)
class OnlineHadamard:
    """The online Hadamard x_block @ kron(outer, inner) / sqrt(n) applied to every contiguous block of n
    columns: n = K is a full transform (down_proj's R4), n = head_dim a head-wise one.

    outer, inner: +-1 matrices in the activations' dtype and device with kron(outer, inner) = H_n (outer may
    be None; inner at most 128). Built once per layer. The kernel holds `left_rows` rows as a
    [segments, inner] tile and multiplies it from the left by `left_factor`, the block-diagonal
    kron(I, outer^T) zero-padded to a power of two, or, with `left_split` = (P1, P2), holds a row as two
    tiles of P1 and P2 segments and multiplies by the four blocks of a [P1 + P2]^2 factor. left_factor is
    None when the outer factor is too large for the kernel, or with fuse_outer=False: then one batched
    matmul applies it first."""
    outer: torch.Tensor | None
    inner: torch.Tensor
    n: int
    row_length: int
    fuse_outer: bool = True
    left_factor: torch.Tensor | None = field(init=False, repr=False)
    left_rows: int = field(init=False, default=1)
    left_split: tuple[int, int] | None = field(init=False, default=None)

    def __post_init__(self):
        outer_size = 1 if self.outer is None else self.outer.shape[0]
        if self.row_length % self.n or outer_size * self.inner.shape[0] != self.n:
            raise ValueError(f"Hadamard factors {None if self.outer is None else outer_size} x {self.inner.shape[0]} "
                             f"do not make blocks of {self.n} that tile rows of {self.row_length}")
        if self.outer is None or not self.fuse_outer:
            object.__setattr__(self, "left_factor", None)
            return
        segments = self.row_length // self.inner.shape[0]
        rows, split = 1, None
        padded = triton.next_power_of_2(max(16, segments))
        if segments == padded:
            # rows stack without padding: several per program, as for a row without a Hadamard
            rows = max(1, min(FUSED_OUTER_TILE // self.row_length, _MAX_FUSED_OUTER_MULTIROW // segments))
            size = triton.next_power_of_2(max(16, rows * segments))
        else:
            first = padded // 2
            second = triton.next_power_of_2(max(16, segments - first))
            if first >= 16 and first + second < padded:   # two tiles waste less than one padded one
                split = (first, second)
            size = first + second if split else padded
        left = None
        if padded <= _MAX_FUSED_OUTER.get(self.inner.dtype, 0):
            left = torch.zeros(size, size, dtype=self.inner.dtype, device=self.inner.device)
            eye = torch.eye(rows * segments // outer_size, dtype=self.inner.dtype, device=self.inner.device)
            left[:rows * segments, :rows * segments] = torch.kron(eye, self.outer.T.contiguous())
        object.__setattr__(self, "left_factor", left)
        object.__setattr__(self, "left_rows", rows)
        object.__setattr__(self, "left_split", split if left is not None else None)


@triton.jit
def _hadamard_dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "ieee":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    elif PRECISION == "native":
        return tl.dot(a, b, out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def _after_outer(x, bias_ptr, mult_ptr, inner, cols, mask, had_norm, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
                 INNER: tl.constexpr, DOT_PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """The inner Hadamard, scale and bias on a [segments, SEGMENT] tile, as fp32 values rounded to DTYPE (the
    input's) after each op, as the fake quantizer computes them."""
    if INNER > 0:
        # the reference transform computes in fp32 and returns the input's dtype
        x = as_dtype(_hadamard_dot(x, inner, DOT_PRECISION) * had_norm, DTYPE)
    else:
        x = x.to(tl.float32)
    # BASE-Q's Eq. 15: the unpaired scale first, then the bias (S^a x - B), as quant.ActivationQuantizer
    if HAS_SCALE:
        x = as_dtype(x * tl.load(mult_ptr + cols, mask=mask, other=0.0).to(tl.float32), DTYPE)
    if HAS_BIAS:
        x = as_dtype(x - tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32), DTYPE)
    return x


@triton.jit
def _transformed(x_ptr, bias_ptr, mult_ptr, inner, left, offsets, cols, mask, had_norm,
                 HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, INNER: tl.constexpr, LEFT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """A [segments, SEGMENT] tile of x loaded and transformed (outer factor, inner factor, bias, scale)."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if LEFT > 0:
        # rounded to the input dtype in between, as the reference's two-factor transform does
        x = _hadamard_dot(left, x, DOT_PRECISION).to(DTYPE)
    return _after_outer(x, bias_ptr, mult_ptr, inner, cols, mask, had_norm, HAS_BIAS, HAS_SCALE, INNER, DOT_PRECISION,
                        DTYPE)


@triton.jit
def _quantize_split_outer_kernel(
    x_ptr, codes_ptr, scale_ptr, offset_ptr, bias_ptr, mult_ptr, inner_ptr, left_ptr,
    M, K, KP, stride_xm, stride_cm, clip, had_norm,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    P1: tl.constexpr, P2: tl.constexpr, SEGMENT: tl.constexpr,
):
    """One row per step, its segments split into a first tile of P1 and a second of P2 (powers of two): the
    outer factor (e.g. 172 = 128 + 44 -> 128 + 64) is applied as four blocks of the [P1 + P2]^2 left factor
    instead of one [256, 256] dot, 44% fewer MMAs for 172. The factors are loaded once per program; programs
    loop over rows. (Two rows side by side per step, for wider MMAs, spilled and ran slower on the H100.)"""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    P: tl.constexpr = P1 + P2
    first = tl.arange(0, P1)
    second = P1 + tl.arange(0, P2)
    q = tl.arange(0, SEGMENT)
    cols1 = first[:, None] * SEGMENT + q[None, :]
    cols2 = second[:, None] * SEGMENT + q[None, :]
    ok1 = cols1 < K
    ok2 = cols2 < K
    inner = tl.load(inner_ptr + q[:, None] * SEGMENT + q[None, :])
    l11 = tl.load(left_ptr + first[:, None] * P + first[None, :])
    l12 = tl.load(left_ptr + first[:, None] * P + second[None, :])
    l21 = tl.load(left_ptr + second[:, None] * P + first[None, :])
    l22 = tl.load(left_ptr + second[:, None] * P + second[None, :])
    for row in range(tl.program_id(0), M, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        x1 = tl.load(x_ptr + row64 * stride_xm + cols1, mask=ok1, other=0.0)
        x2 = tl.load(x_ptr + row64 * stride_xm + cols2, mask=ok2, other=0.0)
        # rounded to the input dtype in between, as the reference's two-factor transform does
        y1 = (_hadamard_dot(l11, x1, DOT_PRECISION) + _hadamard_dot(l12, x2, DOT_PRECISION)).to(DTYPE)
        y2 = (_hadamard_dot(l21, x1, DOT_PRECISION) + _hadamard_dot(l22, x2, DOT_PRECISION)).to(DTYPE)
        y1 = _after_outer(y1, bias_ptr, mult_ptr, inner, cols1, ok1, had_norm, HAS_BIAS, HAS_SCALE, SEGMENT,
                          DOT_PRECISION, DTYPE)
        y2 = _after_outer(y2, bias_ptr, mult_ptr, inner, cols2, ok2, had_norm, HAS_BIAS, HAS_SCALE, SEGMENT,
                          DOT_PRECISION, DTYPE)
        xmax = tl.maximum(tl.max(tl.max(tl.where(ok1, y1, float("-inf")), axis=1), axis=0),
                          tl.max(tl.max(tl.where(ok2, y2, float("-inf")), axis=1), axis=0))
        xmin = tl.minimum(tl.min(tl.min(tl.where(ok1, y1, float("inf")), axis=1), axis=0),
                          tl.min(tl.min(tl.where(ok2, y2, float("inf")), axis=1), axis=0))
        scale, zero = asymmetric_grid(xmin, xmax, clip, 15, DTYPE)
        codes1 = asymmetric_code(y1, scale, zero, 15, DTYPE) - 8.0
        codes2 = asymmetric_code(y2, scale, zero, 15, DTYPE) - 8.0
        row_c = codes_ptr + row64 * stride_cm
        tl.store(row_c + cols1, tl.where(ok1, codes1, 0.0).to(tl.int8), mask=cols1 < KP)
        tl.store(row_c + cols2, tl.where(ok2, codes2, 0.0).to(tl.int8), mask=cols2 < KP)
        tl.store(scale_ptr + row, scale)
        tl.store(offset_ptr + row, scale * (8.0 - zero))


@triton.jit
def _quantize_activation_kernel(
    x_ptr, codes_ptr, scale_ptr, offset_ptr, bias_ptr, mult_ptr, inner_ptr, left_ptr,
    M, K, KP, stride_xm, stride_cm, clip, had_norm,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, INNER: tl.constexpr, LEFT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, PER_ROW: tl.constexpr, SEGMENT: tl.constexpr,
    TWO_PASS: tl.constexpr,
):
    """Single pass: groups of BLOCK_M rows, each held whole as PER_ROW segments of SEGMENT columns; a program
    walks groups pid, pid + programs, ..., so a factor loaded once serves many rows (LEFT: the size of the
    block-diagonal outer factor for a group, BLOCK_M * PER_ROW). Two passes (TWO_PASS): one row per group,
    read in chunks of PER_ROW segments twice. Tiles are loaded in their [segments, SEGMENT] shape: reshaping a row
    tile into that shape instead made the tensor-core dot sum wrongly on the H100 (Triton 3.6;
    experiments/check_hadamard_dot.py)."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    segment = tl.arange(0, BLOCK_M * PER_ROW)
    cols = (segment % PER_ROW)[:, None] * SEGMENT + tl.arange(0, SEGMENT)[None, :]
    inner = None
    left = None
    if INNER > 0:
        inner = tl.load(inner_ptr + tl.arange(0, INNER)[:, None] * INNER + tl.arange(0, INNER)[None, :])
    if LEFT > 0:
        left = tl.load(left_ptr + tl.arange(0, LEFT)[:, None] * LEFT + tl.arange(0, LEFT)[None, :])
    for group in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = group * BLOCK_M + segment // PER_ROW
        row_ok = (rows < M)[:, None]
        row_x = rows[:, None].to(tl.int64) * stride_xm
        row_c = rows[:, None].to(tl.int64) * stride_cm
        if TWO_PASS:
            xmax = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            xmin = tl.full((BLOCK_M,), float("inf"), tl.float32)
            for start in range(0, K, PER_ROW * SEGMENT):
                chunk = start + cols
                x = _transformed(x_ptr, bias_ptr, mult_ptr, inner, left, row_x + chunk, chunk, row_ok & (chunk < K),
                                 had_norm, HAS_BIAS, HAS_SCALE, INNER, LEFT, DOT_PRECISION)
                xmax = tl.maximum(xmax, tl.max(tl.max(tl.where(chunk < K, x, float("-inf")), axis=1), axis=0))
                xmin = tl.minimum(xmin, tl.min(tl.min(tl.where(chunk < K, x, float("inf")), axis=1), axis=0))
            scale, zero = asymmetric_grid(xmin, xmax, clip, 15, DTYPE)
            for start in range(0, KP, PER_ROW * SEGMENT):
                chunk = start + cols
                x = _transformed(x_ptr, bias_ptr, mult_ptr, inner, left, row_x + chunk, chunk, row_ok & (chunk < K),
                                 had_norm, HAS_BIAS, HAS_SCALE, INNER, LEFT, DOT_PRECISION)
                codes = asymmetric_code(x, scale[:, None], zero[:, None], 15, DTYPE) - 8.0
                tl.store(codes_ptr + row_c + chunk, tl.where(chunk < K, codes, 0.0).to(tl.int8),
                         mask=row_ok & (chunk < KP))
        else:
            col_ok = cols < K
            x = _transformed(x_ptr, bias_ptr, mult_ptr, inner, left, row_x + cols, cols, row_ok & col_ok, had_norm,
                             HAS_BIAS, HAS_SCALE, INNER, LEFT, DOT_PRECISION)
            seg_max = tl.max(tl.where(col_ok, x, float("-inf")), axis=1)
            seg_min = tl.min(tl.where(col_ok, x, float("inf")), axis=1)
            xmax = tl.max(tl.reshape(seg_max, (BLOCK_M, PER_ROW)), axis=1)
            xmin = tl.min(tl.reshape(seg_min, (BLOCK_M, PER_ROW)), axis=1)
            scale, zero = asymmetric_grid(xmin, xmax, clip, 15, DTYPE)
            seg_scale = tl.reshape(tl.broadcast_to(scale[:, None], (BLOCK_M, PER_ROW)), (BLOCK_M * PER_ROW,))
            seg_zero = tl.reshape(tl.broadcast_to(zero[:, None], (BLOCK_M, PER_ROW)), (BLOCK_M * PER_ROW,))
            codes = asymmetric_code(x, seg_scale[:, None], seg_zero[:, None], 15, DTYPE) - 8.0
            tl.store(codes_ptr + row_c + cols, tl.where(col_ok, codes, 0.0).to(tl.int8), mask=row_ok & (cols < KP))
        token = group * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(scale_ptr + token, scale, mask=token < M)
        tl.store(offset_ptr + token, scale * (8.0 - zero), mask=token < M)


def quantize_activations(x: torch.Tensor, clip: float = 1.0, bias: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None, hadamard: OnlineHadamard | None = None,
                         hadamard_precision: str | None = None):
    """Per-token asymmetric 4-bit quantization of (x H) * scale - bias, x [M, K], H an optional Hadamard.

    hadamard: an OnlineHadamard for rows of K, or None.
    hadamard_precision: the in-kernel dots: "native" (tensor cores on the input dtype; the default for
    bf16/fp16), "tf32", or "ieee" (FMA in fp32; the default for fp32 inputs).
    Returns (codes int8 [M, Kp], scale fp32 [M], offset fp32 [M]); see the package docstring.
    """
    check_device(x)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_activations needs a row-major [M, K] tensor, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    m, k = x.shape
    kp = -(-k // PACK_GROUP) * PACK_GROUP
    inner = left = x  # placeholder pointers for the factors a call does not have
    inner_size = left_size = 0
    had_norm = 1.0
    if hadamard is not None:
        if hadamard.row_length != k:
            raise ValueError(f"the OnlineHadamard was built for rows of {hadamard.row_length}, x has rows of {k}")
        if hadamard.outer is not None and hadamard.left_factor is None:
            # too large for the kernel's shared memory: one batched matmul before the kernel,
            # y[t, p, q] = sum_i outer[i, p] x[t, i, q] over every block t
            outer = hadamard.outer
            x = torch.matmul(outer.T, x.view(m * (k // hadamard.n), outer.shape[0], -1)).view(m, k)
        inner, inner_size, had_norm = hadamard.inner, hadamard.inner.shape[0], 1.0 / math.sqrt(hadamard.n)
        if hadamard.left_factor is not None:
            left, left_size = hadamard.left_factor, hadamard.left_factor.shape[0]
    codes = torch.empty(m, kp, dtype=torch.int8, device=x.device)
    tok_scale = torch.empty(m, dtype=torch.float32, device=x.device)
    tok_offset = torch.empty(m, dtype=torch.float32, device=x.device)
    # the clip the reference multiplies by is a tensor of the model's dtype
    clip = float(torch.tensor(float(clip)).to(x.dtype))
    # bf16/fp16 values and +-1 are exact as tensor-core operands; fp32 ones are not exact in tf32
    precision = hadamard_precision or ("ieee" if x.dtype == torch.float32 else "native")
    two_pass = False
    if hadamard is not None and hadamard.left_split is not None:
        first, second = hadamard.left_split
        programs = m if interpreting() else min(m, SPLIT_OUTER_PROGRAMS_PER_SM * _sm_count(x.device))
        _quantize_split_outer_kernel[(max(programs, 1),)](
            x, codes, tok_scale, tok_offset, bias if bias is not None else x, scale if scale is not None else x,
            inner, left, m, k, kp, x.stride(0), codes.stride(0), clip, had_norm,
            HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, DOT_PRECISION=precision, P1=first, P2=second,
            SEGMENT=inner_size, num_warps=4 if interpreting() else SPLIT_OUTER_WARPS, num_stages=SPLIT_OUTER_STAGES)
        return codes, tok_scale, tok_offset
    stages = 3   # Triton's default
    if left_size:   # whole rows in one program, the outer factor applied in it
        block_m, segment = hadamard.left_rows, inner_size
        per_row = left_size // block_m
        resident = left_size >= RESIDENT_OUTER_MIN and not interpreting()
        if resident:
            warps, stages = _warps_for(left_size * segment, RESIDENT_OUTER_WARPS), RESIDENT_OUTER_STAGES
            programs = min(triton.cdiv(m, block_m), RESIDENT_OUTER_PROGRAMS_PER_SM * _sm_count(x.device))
        else:
            warps, programs = _warps_for(left_size * segment), triton.cdiv(m, block_m)
    else:
        segment = inner_size or PACK_GROUP
        block_k = triton.next_power_of_2(kp)
        two_pass = block_k > SINGLE_PASS_MAX_K
        if two_pass:
            block_m, per_row, warps = 1, max(1, CHUNK_VALUES // segment), 4
        else:
            block_m = max(1, (4 if interpreting() else 1) * _TILE // block_k)
            per_row, warps = block_k // segment, _warps_for(block_m * block_k)
        programs = triton.cdiv(m, block_m)
    _quantize_activation_kernel[(max(programs, 1),)](
        x, codes, tok_scale, tok_offset,
        bias if bias is not None else x, scale if scale is not None else x, inner, left,
        m, k, kp, x.stride(0), codes.stride(0), clip, had_norm,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, INNER=inner_size, LEFT=left_size,
        DOT_PRECISION=precision, BLOCK_M=block_m, PER_ROW=per_row, SEGMENT=segment, TWO_PASS=two_pass,
        num_warps=warps, num_stages=stages)
    return codes, tok_scale, tok_offset


def _warps_for(values: int, at_least: int = 4) -> int:
    """num_warps for a program holding `values` values at once: about 1K per warp, 4 to 16."""
    return 4 if interpreting() else min(16, max(at_least, values // 1024))


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


__all__ = ["OnlineHadamard", "quantize_activations"]
