"""The Triton kernels against the project's quantizer and an integer reference. On a CPU they run in
Triton's interpreter (conftest sets TRITON_INTERPRET=1); with a GPU the same tests compile them for real.
Inputs are drawn fresh each run; the seed is in the failure message."""

from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton")

from baseq.hadamard import hadamard_matrix, hadamard_transform, kronecker_factors  # noqa: E402
from baseq.quant import asymmetric_codes, fake_quantize_asymmetric  # noqa: E402
from baseq_kernels import (PACK_GROUP, OnlineHadamard, dequantize_kv, kv_cache_round_trip, pack_int4,  # noqa: E402
                           quantize_activations, quantize_kv, rotate_heads, unpack_int4_codes, unpack_int4_reference,
                           w4a4_matmul)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gen():
    """A fresh seed each run; gen.initial_seed() reproduces a failure."""
    return torch.Generator().manual_seed(random.randrange(2**31))


def padded(codes: torch.Tensor) -> torch.Tensor:
    m, k = codes.shape
    kp = -(-k // PACK_GROUP) * PACK_GROUP
    out = torch.zeros(m, kp, dtype=torch.int8)
    out[:, :k] = codes
    return out


def test_pack_int4_roundtrip_and_padding(gen):
    codes = torch.randint(-8, 8, (7, 200), generator=gen, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 128) and packed.dtype == torch.int8
    assert torch.equal(unpack_int4_reference(packed, 200), codes), f"seed {gen.initial_seed()}"
    assert torch.equal(unpack_int4_reference(packed, 256)[:, 200:], torch.zeros(7, 56, dtype=torch.int8))
    assert torch.equal(unpack_int4_codes(packed.to(DEVICE)).cpu(), padded(codes))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8]]))


@pytest.mark.parametrize("m,n,k", [(1, 48, 200), (16, 64, 256), (70, 40, 640), (129, 96, 384)])
def test_w4a4_gemm_is_exact_integer_arithmetic(gen, m, n, k):
    """Unit scales and zero offsets leave the integer dot product, which must be exact (decode path for
    m <= 64 with split-K atomics, prefill path above)."""
    x = torch.randint(-8, 8, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    expected = (x.long() @ w.long().T).float()
    # packed int4 unpacked in the GEMM loop, unpacked by a pass before it, and int8 codes given directly
    for weight, unpack_first in ((pack_int4(w), False), (pack_int4(w), True), (padded(w), None)):
        out = w4a4_matmul(padded(x).to(DEVICE), torch.ones(m, device=DEVICE), torch.zeros(m, device=DEVICE),
                          weight.to(DEVICE), torch.ones(n, device=DEVICE), w.float().sum(1).to(DEVICE),
                          out_dtype=torch.float32, unpack_first=unpack_first)
        assert torch.equal(out.cpu(), expected), f"seed {gen.initial_seed()}"


def test_w4a4_gemm_epilogue_matches_dequantized_matmul(gen):
    """Scales, zero points and bias: the result equals the float matmul of the dequantized operands."""
    m, n, k = 80, 64, 320
    q = torch.randint(0, 16, (m, k), generator=gen)
    zero = torch.randint(0, 16, (m, 1), generator=gen).float()
    x_scale = torch.rand(m, 1, generator=gen) + 0.1
    w = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(n, generator=gen) + 0.1
    bias = torch.randn(n, generator=gen)
    expected = ((q - zero) * x_scale).double() @ (w.double() * w_scale.double()[:, None]).T + bias.double()
    out = w4a4_matmul(padded((q - 8).to(torch.int8)).to(DEVICE), x_scale[:, 0].to(DEVICE),
                      (x_scale * (8 - zero))[:, 0].to(DEVICE), pack_int4(w).to(DEVICE), w_scale.to(DEVICE),
                      w.float().sum(1).to(DEVICE), bias.to(DEVICE), out_dtype=torch.float32)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-4, msg=f"seed {gen.initial_seed()}")


def test_w4a4_gemm_rejects_mismatched_operands():
    codes = torch.zeros(4, 256, dtype=torch.int8, device=DEVICE)
    packed = torch.zeros(8, 64, dtype=torch.int8, device=DEVICE)
    ones = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="do not match packed weight"):
        w4a4_matmul(codes, ones[:4], ones[:4], packed, ones, ones)


@pytest.mark.parametrize("k,online_hadamard,block", [
    (200, False, None), (576, False, None), (5000, False, None),   # the last in two passes over chunks
    # full transforms: outer 12 / 32 and inner 128 in the kernel; outer 172 (above the fp32 limit for the
    # kernel) as a matmul before it, inner 64 in it
    (1536, True, 1536), (4096, True, 4096), (11008, True, 11008),
    (576, True, 64), (768, True, 192),        # head-wise: 9 heads of 64 (inner only), 4 heads of 192 = 12 x 16
])
def test_activation_quantizer_codes_match_the_fake_quantizer(gen, k, online_hadamard, block):
    m = 9
    x = torch.randn(m, k, generator=gen) * 3 + torch.randn(k, generator=gen)
    bias = torch.randn(k, generator=gen) * 0.5
    scale = torch.rand(k, generator=gen) + 0.5
    hadamard = None
    reference_in = x
    if online_hadamard:
        outer, inner = kronecker_factors(block)
        hadamard = OnlineHadamard(None if outer is None else outer.float().to(DEVICE), inner.float().to(DEVICE), block, k)
        assert (hadamard.left_factor is not None) == (outer is not None and k != 11008)
        reference_in = hadamard_transform(x, n=block)
    ref_codes, ref_scale, ref_zero = asymmetric_codes(reference_in * scale - bias, 4, 0.9)
    codes, tok_scale, tok_offset = quantize_activations(x.to(DEVICE), 0.9, bias.to(DEVICE), scale.to(DEVICE), hadamard)
    codes, tok_scale, tok_offset = codes.cpu(), tok_scale.cpu(), tok_offset.cpu()
    assert codes.shape == (m, -(-k // PACK_GROUP) * PACK_GROUP)
    assert torch.equal(codes[:, k:], torch.zeros_like(codes[:, k:])), "padding codes must be 0"
    diff = (codes[:, :k].float() + 8 - ref_codes).abs()
    # Exact but for rounding: the kernel sums the Hadamard in another order, and torch on the host may divide
    # by the constant 15 through its reciprocal, so a scale can differ in the last bit and a code that sits
    # on a rounding boundary can move by one.
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, f"seed {gen.initial_seed()}"
    torch.testing.assert_close(tok_scale, ref_scale[:, 0], rtol=1e-6, atol=0, msg=f"seed {gen.initial_seed()}")
    torch.testing.assert_close(tok_offset, ref_scale[:, 0] * (8 - ref_zero[:, 0]), rtol=1e-6, atol=0,
                               msg=f"seed {gen.initial_seed()}")
    if not online_hadamard and DEVICE.type == "cpu":
        assert diff.max() == 0, f"seed {gen.initial_seed()}"   # the interpreter divides as torch does


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision dots are wrong in the interpreter")
@pytest.mark.parametrize("k", [4096, 11008])   # outer factors 32 and 172, both in the kernel
def test_activation_quantizer_in_bfloat16_follows_the_fake_quantizer(gen, k):
    x = (torch.randn(64, k, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    outer, inner = kronecker_factors(k)
    hadamard = OnlineHadamard(outer.to(DEVICE, torch.bfloat16), inner.to(DEVICE, torch.bfloat16), k, k)
    assert hadamard.left_factor is not None
    rotated = hadamard_transform(x)
    ref_codes, ref_scale, ref_zero = asymmetric_codes(rotated, 4, torch.tensor(0.9, dtype=torch.bfloat16))
    codes, tok_scale, tok_offset = quantize_activations(x, 0.9, None, None, hadamard)
    # the outer factor's output is rounded to bf16 before the inner one (the reference rounds once, at the
    # end), which can move a token's min/max, hence its whole grid: compare dequantized values
    dequantized = codes.float() * tok_scale[:, None] + tok_offset[:, None]
    reference = (ref_codes.float() - ref_zero.float()) * ref_scale.float()
    beyond_a_step = (dequantized - reference).abs() > 1.01 * ref_scale.float()
    assert beyond_a_step.float().mean().item() < 1e-3, f"seed {gen.initial_seed()}"
    # H100: 2.5% (two equally valid grids; a 4-bit step is ~10% of a value RMS)
    assert ((dequantized - reference).norm() / reference.norm()).item() < 5e-2, f"seed {gen.initial_seed()}"


@pytest.mark.parametrize("with_bias,with_hadamard", [(False, False), (True, False), (True, True)])
def test_kv4_cache_roundtrip_equals_the_fake_kv_quantizer(gen, with_bias, with_hadamard):
    x = torch.randn(2, 5, 3, 64, generator=gen).transpose(1, 2)   # [B, H, S, D], not contiguous
    bias = torch.randn(3, 64, generator=gen) * 0.3 if with_bias else None
    hadamard = hadamard_matrix(64).float() if with_hadamard else None
    on = (lambda t: None if t is None else t.to(DEVICE))  # noqa: E731
    packed, scale, zero = quantize_kv(x.to(DEVICE), 0.95, on(bias), on(hadamard))
    assert packed.shape == (2, 3, 5, 32) and packed.dtype == torch.uint8
    out = dequantize_kv(packed, scale, zero, torch.float32, on(bias)).cpu()
    clip = torch.tensor(0.95)
    keys = hadamard_transform(x) if with_hadamard else x   # R3 as AttentionQuantizer applies it
    expected = fake_quantize_asymmetric(keys, 4, clip) if bias is None else \
        fake_quantize_asymmetric(keys - bias[:, None], 4, clip) + bias[:, None]
    if with_hadamard:
        # the kernel's dot sums R3 in another order than hadamard_transform: values agree to rounding, except
        # that a code sitting on a rounding boundary may move by one step (its row's scale)
        diff = (out - expected).abs()
        step = scale.cpu()[..., None]
        assert (diff <= 1.01 * step + 1e-5).all() and (diff > 1e-5).float().mean() < 1e-2, \
            f"seed {gen.initial_seed()}"
    else:
        # equal but where torch's host division by 15 rounds a scale differently in its last bit
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, msg=f"seed {gen.initial_seed()}")
    # the one-pass round trip is the same computation, to the bit
    one_pass = kv_cache_round_trip(x.to(DEVICE), 0.95, on(bias), on(hadamard)).cpu()
    assert torch.equal(one_pass, out), f"seed {gen.initial_seed()}"


def test_kv4_cache_takes_one_learned_clip_per_head(gen):
    from baseq.quant import KVQuantizer, effective_clip

    fake = KVQuantizer(4, clip_ratio=0.9, learn_clip=True, heads=3)
    with torch.no_grad():
        fake.clip_logit.copy_(torch.tensor([2.0, -1.0, 0.5]).reshape(3, 1, 1))
    x = torch.randn(2, 3, 5, 64, generator=gen)
    clips = effective_clip(fake, torch.float32).detach()
    out = kv_cache_round_trip(x.to(DEVICE), clips.to(DEVICE)).cpu()
    torch.testing.assert_close(out, fake(x).detach(), rtol=1e-5, atol=1e-6, msg=f"seed {gen.initial_seed()}")
    with pytest.raises(ValueError, match="one per head"):
        kv_cache_round_trip(x.to(DEVICE), torch.ones(2, device=DEVICE))


def test_rotate_heads_is_the_head_hadamard(gen):
    x = torch.randn(2, 7, 4, 64, generator=gen).transpose(1, 2)
    rotated = rotate_heads(x.to(DEVICE), hadamard_matrix(64).float().to(DEVICE)).cpu()
    assert rotated.is_contiguous()
    torch.testing.assert_close(rotated, hadamard_transform(x), rtol=1e-5, atol=1e-6, msg=f"seed {gen.initial_seed()}")
    with pytest.raises(ValueError, match=r"\+-1 \[64, 64\] matrix"):
        rotate_heads(x.to(DEVICE), hadamard_matrix(32).float().to(DEVICE))


def test_kv4_round_trip_in_bfloat16_equals_the_cache_kernels(gen):
    """The one-pass round trip and quantize -> dequantize agree to the bit in the model's dtype too."""
    x = (torch.randn(2, 7, 4, 128, generator=gen) * 2).to(DEVICE, torch.bfloat16).transpose(1, 2)
    bias = (torch.randn(4, 128, generator=gen) * 0.3).to(DEVICE, torch.bfloat16)
    hadamard = hadamard_matrix(128).to(DEVICE, torch.bfloat16)
    packed, scale, zero = quantize_kv(x, 0.9, bias, hadamard)
    assert torch.equal(kv_cache_round_trip(x, 0.9, bias, hadamard),
                       dequantize_kv(packed, scale, zero, torch.bfloat16, bias)), f"seed {gen.initial_seed()}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision dots are wrong in the interpreter")
def test_rotate_heads_in_bfloat16_follows_hadamard_transform(gen):
    x = (torch.randn(2, 64, 8, 128, generator=gen) * 3).to(DEVICE, torch.bfloat16).transpose(1, 2)
    rotated = rotate_heads(x, hadamard_matrix(128).to(DEVICE, torch.bfloat16)).float()
    reference = hadamard_transform(x).float()
    # both sum the exact +-1 products in fp32 and round once; only the summation order differs
    assert (rotated != reference).float().mean().item() < 1e-2, f"seed {gen.initial_seed()}"
    torch.testing.assert_close(rotated, reference, rtol=8e-3, atol=1e-2, msg=f"seed {gen.initial_seed()}")


def test_activation_quantizer_rejects_a_hadamard_that_does_not_tile_the_row():
    _, inner = kronecker_factors(64)
    with pytest.raises(ValueError, match="tile rows of 200"):
        OnlineHadamard(None, inner.float().to(DEVICE), 64, 200)
    with pytest.raises(ValueError, match="built for rows of 128"):
        quantize_activations(torch.randn(3, 256, device=DEVICE), hadamard=OnlineHadamard(None, inner.float(), 64, 128))
