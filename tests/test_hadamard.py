"""Hadamard constructions and the online transform (CPU, a few seconds)."""

from __future__ import annotations

import math
import time
from functools import lru_cache

import pytest
import torch

from baseq import hadamard as hd
from baseq.hadamard import (HadamardSizeError, hadamard_matrix, hadamard_transform, has_hadamard,
                            orthonormal_hadamard, random_hadamard)

POW2 = [1 << k for k in range(15)]  # 1 .. 16384
ODD_ORDERS = [12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 140, 148, 172]
MODEL_SIZES = [576, 896, 1536, 3072, 4864, 5120, 8960, 11008, 13824, 14336, 18944, 27648]
ALL_SIZES = sorted(set(POW2 + ODD_ORDERS + MODEL_SIZES))
DENSE = [n for n in ALL_SIZES if n <= 2048]  # full H H^T is cheap here
SAMPLED = [n for n in ALL_SIZES if 2048 < n <= 8192]  # Kronecker structure + a block of rows
HUGE = [n for n in ALL_SIZES if n > 8192]  # never formed densely: checked through the transform


def _assert_hadamard(h: torch.Tensor, n: int) -> None:
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@lru_cache(maxsize=None)
def _checked_hadamard(n: int) -> torch.Tensor:
    h = hadamard_matrix(n)
    _assert_hadamard(h, n)
    return h


def _sylvester_column(p: int, j: int) -> torch.Tensor:
    """Column j of the Sylvester matrix of order p: H[i, j] = (-1)^popcount(i & j)."""
    bits = torch.arange(p) & j
    parity = torch.zeros(p, dtype=torch.int64)
    for b in range(p.bit_length()):
        parity ^= (bits >> b) & 1
    return 1.0 - 2.0 * parity.double()


def _column(n: int, j: int) -> torch.Tensor:
    """Column j of H_n = kron(H_m, H_{2^k}), without forming H_n or H_{2^k}."""
    m, p = hd._split(n)
    return torch.kron(hadamard_matrix(m)[:, j // p], _sylvester_column(p, j % p))


def test_every_listed_size_is_supported():
    for n in ALL_SIZES:
        assert has_hadamard(n), n


@pytest.mark.parametrize("n", DENSE)
def test_dense_sizes_are_hadamard(n):
    _checked_hadamard(n)


@pytest.mark.parametrize("n", SAMPLED)
def test_large_sizes_are_kronecker_of_hadamard_factors(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    m, p = hd._split(n)
    a, b = (m, p) if m > 1 else (n // 1024, 1024)  # Sylvester: H_{2^k} = kron(H_{2^(k-10)}, H_1024)
    # Both factors are checked densely (+-1, orthogonal) and a Kronecker product of Hadamard matrices
    # is Hadamard, so equality with it proves H_n is one; compared a block row at a time to save memory.
    ha, hb = _checked_hadamard(a), _checked_hadamard(b)
    for i in range(a):
        assert torch.equal(h[i * b:(i + 1) * b].view(b, a, b), hb[:, None, :] * ha[i][None, :, None])
    rows = torch.arange(0, n, n // 16)  # plus a direct spot check across all blocks
    assert torch.equal(h[rows] @ h.T, n * torch.eye(n, dtype=torch.float64)[rows])


@pytest.mark.parametrize("n", HUGE)
def test_huge_sizes_through_the_transform(n):
    for f, h, ht in hd._transform_plan(n, torch.device("cpu"), torch.float64):  # the factors it multiplies by
        _assert_hadamard(h, f)
        assert torch.equal(ht, h.T)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(16, n, generator=gen, dtype=torch.float64)
    y = hadamard_transform(x)
    torch.testing.assert_close(y @ y.T, x @ x.T, rtol=1e-12, atol=1e-9)  # orthogonal: Gram preserved
    for j in (0, 1, n // 3, n - 1):
        torch.testing.assert_close(y[:, j], x @ _column(n, j) / math.sqrt(n), rtol=1e-12, atol=1e-12)


def test_base_constructions_used_for_real_sizes():
    assert hd._split(576) == (36, 16) and hd._base_kind(36) == ("paley2", 17)
    assert hd._split(1536) == (12, 128) and hd._base_kind(12) == ("paley1", 11)
    assert hd._split(4864) == (76, 64) and hd._base_kind(76) == ("paley2", 37)
    assert hd._split(11008) == (172, 64) and hd._base_kind(172) == ("goethals_seidel", 43)
    assert hd._split(14336) == (28, 512)
    assert hd._split(4096) == (1, 4096)


def test_paley_with_prime_powers():
    assert hd._base_kind(28) == ("paley1", 27)  # GF(3^3)
    assert hd._base_kind(52) == ("paley2", 25)  # GF(5^2)
    _assert_hadamard(hd._paley1(27), 28)
    _assert_hadamard(hd._paley2(9), 20)  # GF(3^2)
    _assert_hadamard(hd._paley2(25), 52)
    _assert_hadamard(hd._paley2(49), 100)  # GF(7^2)
    _assert_hadamard(hd._paley1(343), 344)  # GF(7^3)
    _assert_hadamard(hd._paley2(121), 244)  # GF(11^2)


def test_goethals_seidel_172_is_fast_and_deterministic():
    hd._cyclotomic_gs_sets.cache_clear()
    start = time.perf_counter()
    sets = hd._cyclotomic_gs_sets(43)
    assert time.perf_counter() - start < 2.0
    hd._cyclotomic_gs_sets.cache_clear()
    assert hd._cyclotomic_gs_sets(43) == sets
    _assert_hadamard(hd._goethals_seidel(43), 172)


@pytest.mark.parametrize("n", [3, 6, 10, 14, 0, -4])
def test_unsupported_sizes_raise(n):
    assert not has_hadamard(n)
    for fn in (hadamard_matrix, orthonormal_hadamard, lambda k: random_hadamard(k, 0)):
        with pytest.raises(HadamardSizeError, match=rf"size {n}\b"):
            fn(n)
    if n > 0:
        with pytest.raises(HadamardSizeError, match=rf"size {n}\b"):
            hadamard_transform(torch.zeros(2, n))


@pytest.mark.parametrize("bad", [4.0, "4", True, None])
def test_non_int_sizes_raise(bad):
    assert not has_hadamard(bad)
    with pytest.raises(HadamardSizeError):
        hadamard_matrix(bad)


def test_error_is_a_one_line_value_error():
    with pytest.raises(ValueError) as info:
        hadamard_matrix(10)
    msg = str(info.value)
    assert "\n" not in msg and "10" in msg and "'none'" in msg


def test_returned_matrix_cannot_corrupt_the_cache():
    h = hadamard_matrix(12)
    h.zero_()
    _assert_hadamard(hadamard_matrix(12), 12)
    o = orthonormal_hadamard(172)
    o.zero_()
    torch.testing.assert_close(orthonormal_hadamard(172) @ orthonormal_hadamard(172).T,
                               torch.eye(172, dtype=torch.float64))


def test_orthonormal_hadamard():
    q = orthonormal_hadamard(576)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(576, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(q * math.sqrt(576), hadamard_matrix(576), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [64, 576, 172])
def test_random_hadamard(n):
    r = random_hadamard(n, seed=3)
    assert r.dtype == torch.float64 and r.shape == (n, n)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-13)
    assert torch.equal(r, random_hadamard(n, seed=3))
    assert not torch.equal(r, random_hadamard(n, seed=4))
    signs = (r / orthonormal_hadamard(n))[0]  # H diag(D): every column is +- the Hadamard column
    assert torch.equal(signs.abs().round(), torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(r, orthonormal_hadamard(n) * signs, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 40, 52, 76, 172, 256, 576, 896, 1536, 3072, 4864])
def test_transform_matches_dense_float64(n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(y, x @ orthonormal_hadamard(n), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [576, 1536, 4864])
def test_transform_low_precision_and_batched(n):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=gen)
    q = orthonormal_hadamard(n)
    ref = x @ q
    y64 = hadamard_transform(x)
    assert y64.shape == (2, 3, n)
    torch.testing.assert_close(y64, ref, rtol=1e-12, atol=1e-12)
    y32 = hadamard_transform(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), ref, rtol=1e-4, atol=1e-5)
    xb = x.bfloat16()
    yb = hadamard_transform(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), xb.double() @ q, rtol=2e-2, atol=2e-2)
    yh = hadamard_transform(x.half())
    assert yh.dtype == torch.float16
    torch.testing.assert_close(yh.double(), ref, rtol=1e-2, atol=1e-2)


def test_transform_blockwise_n():
    x = torch.randn(4, 3 * 172, dtype=torch.float64)
    y = hadamard_transform(x, 172)
    q = orthonormal_hadamard(172)
    torch.testing.assert_close(y, (x.view(4, 3, 172) @ q).view(4, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(x, 3 * 172), hadamard_transform(x))
    with pytest.raises(ValueError):
        hadamard_transform(x, 100)  # 516 is not a multiple of 100


def test_transform_keeps_gradients_and_caches_factors():
    x = torch.randn(3, 1536, dtype=torch.float64, requires_grad=True)
    hadamard_transform(x).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=1e-12, atol=1e-12)  # orthogonal map
    hadamard_transform(torch.randn(2, 1536))
    size = len(hd._TRANSFORM_PLANS)
    first = hd._transform_plan(1536, torch.device("cpu"), torch.float32)
    hadamard_transform(torch.randn(2, 1536))
    assert len(hd._TRANSFORM_PLANS) == size
    assert all(a[1] is b[1] for a, b in zip(hd._transform_plan(1536, torch.device("cpu"), torch.float32), first))


def test_transform_rejects_integer_input():
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("n", [64, 172, 576, 1536])
def test_transpose_transform_is_the_inverse(n):
    x = torch.randn(3, n, dtype=torch.float64)
    h = orthonormal_hadamard(n)
    torch.testing.assert_close(hadamard_transform(x, transpose=True), x @ h.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x), transpose=True), x, rtol=1e-12, atol=1e-12)
