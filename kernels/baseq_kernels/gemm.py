"""W4A4 GEMM on int8 tensor cores: y = x W^T with x as per-token asymmetric 4-bit codes and W as packed
per-channel symmetric int4.

Hopper has no int4 MMA, so both operands run as int8 (exact: |products| <= 64, sums < 2^31). The kernel
computes the transposed tile, acc[n, m] = sum_k W[n, k] x[m, k]: the weight is the MMA's A operand, which
may live in registers, and the activation codes (int8, K-contiguous) are the B operand, read from shared
memory. This puts the token count on the MMA's N dimension, which can be as small as 8: what decode needs.

Two ways to read the packed weight. Decode (few tokens, memory-bound): unpacked in registers inside the K
loop (two shifts), so only int4 bytes are read. Prefill (from UNPACK_MIN_M tokens, compute-bound): one
pass unpacks the whole weight to int8 first, because Triton does not overlap the in-loop unpack with the
MMAs (measured: 0.8-1.0x bf16 in-loop, 1.4-1.6x unpack-first at M=8192; docs/kernels.md).

Epilogue (fp32): y[m, n] = w_scale[n] * (x_scale[m] * acc + x_offset[m] * w_sum[n]) + bias[n], where
w_sum[n] = sum_k W[n, k] accounts for the activation zero point (codes are stored minus 8; see the package
docstring). Small M splits K over programs and adds partial results with fp32 atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import PACK_GROUP, check_device, interpreting

_HALF = PACK_GROUP // 2


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int codes [N, K] in [-8, 7] -> int8 [N, Kp / 2] in the grouped nibble layout (K zero-padded)."""
    if codes.dim() != 2:
        raise ValueError(f"pack_int4 needs a 2-D code matrix, got shape {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    n, k = codes.shape
    kp = -(-k // PACK_GROUP) * PACK_GROUP
    padded = torch.zeros(n, kp, dtype=torch.int16, device=codes.device)
    padded[:, :k] = codes.to(torch.int16)
    groups = padded.view(n, kp // PACK_GROUP, 2, _HALF) & 0xF
    packed = groups[:, :, 0] | (groups[:, :, 1] << 4)
    return packed.to(torch.uint8).view(torch.int8).reshape(n, kp // 2)


def unpack_int4_reference(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4 in torch (the tests' reference): int8 codes [N, k]."""
    n = packed.shape[0]
    groups = packed.view(n, -1, _HALF).to(torch.int16)
    low = ((groups & 0xF) ^ 8) - 8
    high = groups >> 4   # arithmetic shift of the sign-extended byte
    return torch.stack([low, high], dim=2).reshape(n, -1)[:, :k].to(torch.int8)


def _prefill_configs():
    if interpreting():
        # the interpreter's cost is per program: few large tiles
        return [triton.Config({"BLOCK_N": 64, "BLOCK_M": 128, "GROUPS_PER_STEP": 1, "SPLIT_K": 1}, num_warps=4)]
    shapes = [(128, 128, 1, 4, 4), (128, 128, 1, 8, 4), (128, 256, 1, 8, 3), (256, 128, 1, 8, 3),
              (128, 128, 2, 8, 3), (128, 256, 2, 8, 2), (64, 256, 1, 4, 4), (128, 64, 1, 4, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_M": m, "GROUPS_PER_STEP": g, "SPLIT_K": 1}, num_warps=w,
                          num_stages=s) for n, m, g, w, s in shapes]


def _decode_configs():
    if interpreting():
        return [triton.Config({"BLOCK_N": 64, "BLOCK_M": 16, "GROUPS_PER_STEP": 1, "SPLIT_K": 2}, num_warps=4)]
    # (BLOCK_N, GROUPS_PER_STEP, SPLIT_K, warps, stages): reading int4 bytes at full bandwidth needs many
    # loads in flight, from many programs (split K) or deep pipelines (stages x bytes per step)
    shapes = [(64, 1, 1, 4, 4), (64, 1, 2, 4, 4), (64, 1, 4, 4, 4), (64, 1, 8, 4, 4), (128, 1, 2, 4, 4),
              (128, 1, 4, 4, 4), (64, 2, 2, 4, 3), (128, 2, 1, 8, 3), (64, 1, 16, 4, 4), (64, 2, 4, 4, 4),
              (64, 2, 8, 4, 4), (64, 4, 4, 4, 3), (64, 1, 4, 4, 6), (64, 1, 8, 4, 6), (128, 2, 4, 4, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_M": 16, "GROUPS_PER_STEP": g, "SPLIT_K": sk}, num_warps=w,
                          num_stages=s) for n, g, sk, w, s in shapes]


def _prune(configs, named_args, **kwargs):
    groups = named_args["K_GROUPS"]
    kept = [c for c in configs if groups % c.kwargs["GROUPS_PER_STEP"] == 0
            and c.kwargs["SPLIT_K"] <= groups // c.kwargs["GROUPS_PER_STEP"]]
    return kept or [min(configs, key=lambda c: (c.kwargs["GROUPS_PER_STEP"], c.kwargs["SPLIT_K"]))]


@triton.jit
def _w4a4_kernel(
    x_ptr, w_ptr, out_ptr, x_scale_ptr, x_offset_ptr, w_scale_ptr, w_sum_ptr, bias_ptr,
    M, N, K_GROUPS, stride_xm, stride_wn, stride_om, M_BUCKET,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUPS_PER_STEP: tl.constexpr,
    SPLIT_K: tl.constexpr, SWIZZLE: tl.constexpr = 8, PACKED: tl.constexpr = True,
):
    HALF: tl.constexpr = 64
    STEP_BYTES: tl.constexpr = GROUPS_PER_STEP * HALF    # weight bytes per row per step
    STEP_K: tl.constexpr = GROUPS_PER_STEP * 2 * HALF     # activation codes per row per step
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(M, BLOCK_M)
    # neighbouring programs share activation tiles: walk SWIZZLE weight tiles for each activation tile
    per_group = SWIZZLE * num_m
    first_n = (pid // per_group) * SWIZZLE
    group_n = tl.minimum(num_n - first_n, SWIZZLE)
    pid_n = first_n + (pid % per_group) % group_n
    pid_m = (pid % per_group) // group_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = offs_n % N   # wrapped rows keep every load in bounds; they are never stored
    rm = offs_m % M
    if PACKED:
        byte = tl.arange(0, STEP_BYTES)
        low_k = (byte // HALF) * (2 * HALF) + byte % HALF   # activation column of each byte's low nibble
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + byte[None, :]
        x_ptrs = x_ptr + rm[None, :].to(tl.int64) * stride_xm + low_k[:, None]
    else:   # unpacked int8 weight codes [N, Kp]: the layout variant that measures the cost of unpacking
        col = tl.arange(0, STEP_K)
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + col[None, :]
        x_ptrs = x_ptr + rm[None, :].to(tl.int64) * stride_xm + col[:, None]

    steps = K_GROUPS // GROUPS_PER_STEP
    per_split = tl.cdiv(steps, SPLIT_K)
    start = pid_k * per_split
    stop = tl.minimum(start + per_split, steps)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for step in range(start, stop):
        if PACKED:
            w = tl.load(w_ptrs + step * STEP_BYTES)
            x_low = tl.load(x_ptrs + step * STEP_K)
            x_high = tl.load(x_ptrs + step * STEP_K + HALF)
            acc = tl.dot((w << 4) >> 4, x_low, acc, out_dtype=tl.int32)
            acc = tl.dot(w >> 4, x_high, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(tl.load(w_ptrs + step * STEP_K), tl.load(x_ptrs + step * STEP_K), acc, out_dtype=tl.int32)

    first = (pid_k == 0).to(tl.float32)
    y = acc.to(tl.float32) * tl.load(x_scale_ptr + rm)[None, :]
    y += first * tl.load(w_sum_ptr + rn)[:, None] * tl.load(x_offset_ptr + rm)[None, :]
    y *= tl.load(w_scale_ptr + rn)[:, None]
    if HAS_BIAS:
        y += first * tl.load(bias_ptr + rn)[:, None]
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, y, mask=mask, sem="relaxed")


_w4a4_prefill = triton.autotune(configs=_prefill_configs(), key=["M_BUCKET", "N", "K_GROUPS", "HAS_BIAS", "PACKED"],
                                prune_configs_by={"early_config_prune": _prune})(_w4a4_kernel)
_w4a4_decode = triton.autotune(configs=_decode_configs(), key=["M_BUCKET", "N", "K_GROUPS", "HAS_BIAS", "PACKED"],
                               prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["out_ptr"])(_w4a4_kernel)

# At most this many tokens go through the split-K decode kernel.
DECODE_MAX_M = 64
# From this many tokens on, the packed weight is first unpacked to int8 codes by a separate pass (N * K / 2
# bytes read, N * K written: ~2% of the GEMM at M = 8192) and the GEMM reads those: on the H100 the in-loop
# unpack is not overlapped with the MMAs and costs a third of the speed (docs/kernels.md).
UNPACK_MIN_M = 512


@triton.jit
def _unpack_int4_kernel(packed_ptr, out_ptr, N, ROW_BYTES, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    HALF: tl.constexpr = 64
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    byte = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (rows < N)[:, None] & (byte < ROW_BYTES)[None, :]
    b = tl.load(packed_ptr + rows[:, None].to(tl.int64) * ROW_BYTES + byte[None, :], mask=mask, other=0)
    low_k = (byte // HALF) * (2 * HALF) + byte % HALF
    out = out_ptr + rows[:, None].to(tl.int64) * (2 * ROW_BYTES) + low_k[None, :]
    tl.store(out, (b << 4) >> 4, mask=mask)
    tl.store(out + HALF, b >> 4, mask=mask)


def unpack_int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """The packed weight [N, Kp/2] as int8 codes [N, Kp] (padding included), in one kernel pass."""
    check_device(packed)
    n, row_bytes = packed.shape
    out = torch.empty(n, 2 * row_bytes, dtype=torch.int8, device=packed.device)
    block_r, block_b = 32, 256
    _unpack_int4_kernel[(triton.cdiv(n, block_r), triton.cdiv(row_bytes, block_b))](
        packed, out, n, row_bytes, BLOCK_R=block_r, BLOCK_B=block_b)
    return out


def w4a4_matmul(codes: torch.Tensor, x_scale: torch.Tensor, x_offset: torch.Tensor, packed_weight: torch.Tensor,
                w_scale: torch.Tensor, w_sum: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16, unpack_first: bool | None = None) -> torch.Tensor:
    """y [M, N] = dequant(codes) @ dequant(W)^T + bias, computed exactly in int32 then scaled in fp32.

    codes int8 [M, Kp], x_scale/x_offset fp32 [M] (from quantize_activations); packed_weight int8 [N, Kp/2]
    (pack_int4), or the unpacked int8 codes [N, Kp] (twice the bytes; the benchmark's comparison layout);
    w_scale fp32 [N]; w_sum fp32 [N] (row sums of the int4 codes); bias fp32 [N] or None.
    unpack_first: unpack a packed weight to int8 in a separate pass before the GEMM; by default from
    UNPACK_MIN_M tokens on."""
    check_device(codes, packed_weight)
    m, kp = codes.shape
    n = packed_weight.shape[0]
    packed = packed_weight.shape[1] * 2 == kp
    if kp % PACK_GROUP or not (packed or packed_weight.shape[1] == kp):
        raise ValueError(f"activation codes [{m}, {kp}] do not match packed weight {tuple(packed_weight.shape)} "
                         f"(both must cover K padded to a multiple of {PACK_GROUP})")
    if codes.stride(1) != 1 or packed_weight.stride(1) != 1:
        raise ValueError("w4a4_matmul needs row-major codes and packed weight")
    small = m <= DECODE_MAX_M
    if packed and (m >= UNPACK_MIN_M if unpack_first is None else unpack_first):
        packed_weight, packed = unpack_int4_codes(packed_weight), False
    kernel = _w4a4_decode if small else _w4a4_prefill
    out = torch.zeros(m, n, dtype=torch.float32, device=codes.device) if small else \
        torch.empty(m, n, dtype=out_dtype, device=codes.device)
    bucket = triton.next_power_of_2(m) if m < 4096 else 4096 * (m // 4096)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_K"])  # noqa: E731
    kernel[grid](codes, packed_weight, out, x_scale, x_offset, w_scale, w_sum, bias if bias is not None else w_scale,
                 m, n, kp // PACK_GROUP, codes.stride(0), packed_weight.stride(0), out.stride(0), bucket,
                 HAS_BIAS=bias is not None, PACKED=packed)
    return out.to(out_dtype) if small else out


__all__ = ["pack_int4", "unpack_int4_reference", "unpack_int4_codes", "w4a4_matmul", "DECODE_MAX_M", "UNPACK_MIN_M"]
