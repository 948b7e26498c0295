"""Hadamard matrices built from constructions (no stored tables) and an online Hadamard transform.

H_n = kron(H_m, H_{2^k}) with H_{2^k} Sylvester and H_m one of
  * Sylvester (m = 1, 2),
  * Paley I   (m = q + 1,    q = 3 mod 4 a prime power),
  * Paley II  (m = 2(q + 1), q = 1 mod 4 a prime power),
  * cyclotomic Goethals-Seidel (m = 4p, p prime: four circulant +-1 blocks whose -1 positions are unions
    of cyclotomic classes of Z_p, found by a small exhaustive meet-in-the-middle search); this is what
    gives 172 = 4*43 (LLaMA-7B FFN 11008 = 172*64),
  * a Kronecker product of two of the above.
The smallest such m is used, which keeps the dense factor of the online transform small.
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache

import torch

from .errors import UserError

__all__ = [
    "HadamardSizeError",
    "hadamard_matrix",
    "has_hadamard",
    "orthonormal_hadamard",
    "random_hadamard",
    "hadamard_transform",
    "kronecker_factors",
]

# The cyclotomic search enumerates 2^(e+1) class unions per block; 2^8 keeps it well under 0.1 s.
_MAX_CYCLOTOMIC_CLASSES = 7
# Bounds what has_hadamard can spend on searches for odd sizes no model uses.
_MAX_CYCLOTOMIC_PRIME = 1000
# Power-of-two factors of the online transform are split into dense Sylvester blocks of at most this
# size: a few small matmuls beat both one huge dense matmul and a log2(n)-pass butterfly on CPU and GPU.
_MAX_POW2_BLOCK_BITS = 7


class HadamardSizeError(UserError, ValueError):
    """No Hadamard matrix of the requested size can be constructed here."""


def _size_error(n) -> HadamardSizeError:
    return HadamardSizeError(
        f"no Hadamard construction for size {n} (n must be 1, 2, or m*2^k with m built by Sylvester, "
        f"Paley I (m=q+1, q=3 mod 4 prime power), Paley II (m=2(q+1), q=1 mod 4 prime power), "
        f"cyclotomic Goethals-Seidel (some m=4p, p prime) or a Kronecker product of these); pick a model "
        f"whose dimension is supported or set the rotation to 'none' for this matrix")


def _check_size(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise _size_error(n)
    return int(n)


# ----------------------------------------------------------------------------------------------
# number theory and finite fields


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _is_prime(p: int) -> bool:
    pp = _prime_power(p)
    return pp is not None and pp[1] == 1


def _primitive_powers(p: int, e: int) -> list[int]:
    """Powers g^0..g^(q-2) of a primitive element of GF(p^e), as base-p coefficient codes.

    GF(p^e) = GF(p)[x]/(f); we take the first monic f (in code order) for which x has order q-1. Such an
    f is primitive, hence irreducible, so no separate irreducibility test is needed: in the ring of a
    reducible f the unit group is smaller than q-1 and x cannot reach that order.
    """
    q = p ** e
    for tail in range(1, q):  # tail codes f_0 + f_1 x + ...; f_0 = 0 would make x a zero divisor
        if tail % p == 0:
            continue
        f = [(tail // p ** j) % p for j in range(e)]
        cur = [1] + [0] * (e - 1)
        powers = []
        for _ in range(q - 1):
            powers.append(sum(c * p ** j for j, c in enumerate(cur)))
            top = cur[-1]
            cur = [0] + cur[:-1]  # multiply by x, then reduce x^e = -(f_0 + ... + f_{e-1} x^{e-1})
            if top:
                cur = [(c - top * fj) % p for c, fj in zip(cur, f)]
            if cur == [1] + [0] * (e - 1):
                break
        if len(powers) == q - 1 and cur == [1] + [0] * (e - 1):
            return powers
    raise AssertionError(f"no primitive polynomial found for GF({p}^{e})")  # cannot happen


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q), chi the quadratic character (int64, values 0/+-1)."""
    p, e = _prime_power(q)
    chi = torch.full((q,), -1, dtype=torch.int64)
    if e == 1:
        chi[torch.arange(q) ** 2 % q] = 1
        chi[0] = 0
        idx = torch.arange(q)
        return chi[(idx[:, None] - idx[None, :]) % q]
    chi[torch.tensor(_primitive_powers(p, e)[0::2])] = 1  # squares: even powers of a primitive element
    chi[0] = 0
    codes = torch.arange(q)
    diff = torch.zeros(q, q, dtype=torch.int64)
    for j in range(e):  # field subtraction is digit-wise mod p on the coefficient codes
        digit = (codes // p ** j) % p
        diff += ((digit[:, None] - digit[None, :]) % p) * p ** j
    return chi[diff]


# ----------------------------------------------------------------------------------------------
# constructions of the base factor H_m


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def _paley1(q: int) -> torch.Tensor:
    # q = 3 mod 4: Q is skew, S = [[0, 1], [-1, Q]] is a skew conference matrix and H = I + S.
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q).double()
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    # q = 1 mod 4: Q is symmetric, C = [[0, 1], [1, Q]] is a symmetric conference matrix; replace its
    # zeros by [[1, -1], [-1, -1]] and its +-1 entries by +-[[1, 1], [1, -1]].
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q).double()
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@lru_cache(maxsize=None)
def _cyclotomic_gs_sets(p: int) -> tuple[tuple[int, ...], ...] | None:
    """Four subsets of Z_p whose +-1 indicator sequences have periodic autocorrelations summing to 0.

    Each subset is a union of cyclotomic classes (cosets of the index-e subgroup of Z_p^*) plus maybe 0.
    Multiplying by that subgroup then leaves every autocorrelation unchanged, so it is constant on each
    class and the condition is e equations. A meet-in-the-middle search over pairs of unions finds a
    solution; e is tried in increasing order and candidates in a fixed order, so the result is
    deterministic. None if no e <= _MAX_CYCLOTOMIC_CLASSES works.
    """
    if p < 3 or p > _MAX_CYCLOTOMIC_PRIME or not _is_prime(p):
        return None
    g = next(x for x in range(2, p) if all(pow(x, (p - 1) // r, p) != 1 for r in _prime_factors(p - 1)))
    for e in range(1, min(p - 1, _MAX_CYCLOTOMIC_CLASSES) + 1):
        if (p - 1) % e:
            continue
        orbits = [[pow(g, i + e * j, p) for j in range((p - 1) // e)] for i in range(e)] + [[0]]
        reps = [orbit[0] for orbit in orbits[:e]]
        masks = range(1 << (e + 1))
        seqs = torch.ones(len(masks), p, dtype=torch.int64)
        for m in masks:
            for i, orbit in enumerate(orbits):
                if m >> i & 1:
                    seqs[m, orbit] = -1
        paf = torch.stack([(seqs * seqs.roll(-s, dims=1)).sum(1) for s in reps], dim=1).tolist()
        pairs: dict[tuple[int, ...], tuple[int, int]] = {}
        for m1 in masks:
            for m2 in range(m1, len(masks)):
                pairs.setdefault(tuple(a + b for a, b in zip(paf[m1], paf[m2])), (m1, m2))
        for key, (m1, m2) in pairs.items():
            other = pairs.get(tuple(-v for v in key))
            if other is not None:
                return tuple(tuple(sorted(x for i, orbit in enumerate(orbits) if m >> i & 1 for x in orbit))
                             for m in (m1, m2, *other))
    return None


def _prime_factors(n: int) -> list[int]:
    out, d = [], 2
    while d * d <= n:
        if n % d == 0:
            out.append(d)
            while n % d == 0:
                n //= d
        d += 1
    return out + ([n] if n > 1 else [])


def _goethals_seidel(p: int) -> torch.Tensor:
    sets = _cyclotomic_gs_sets(p)
    idx = torch.arange(p)
    shift = (idx[None, :] - idx[:, None]) % p
    blocks = []
    for s in sets:
        seq = torch.ones(p, dtype=torch.float64)
        seq[list(s)] = -1
        blocks.append(seq[shift])  # circulant: row i is the sequence shifted right by i
    a, b, c, d = blocks
    r = torch.eye(p, dtype=torch.float64).flip(1)  # back-diagonal identity
    return torch.cat([
        torch.cat([a, b @ r, c @ r, d @ r], 1),
        torch.cat([-b @ r, a, d.T @ r, -c.T @ r], 1),
        torch.cat([-c @ r, -d.T @ r, a, b.T @ r], 1),
        torch.cat([-d @ r, c.T @ r, -b.T @ r, a], 1),
    ], 0)


@lru_cache(maxsize=None)
def _base_kind(m: int) -> tuple | None:
    """How to build H_m for a base order m (m = 1, 2 or a multiple of 4), or None."""
    if m in (1, 2):
        return ("sylvester",)
    if m % 4:
        return None
    pp = _prime_power(m - 1)
    if pp is not None and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    pp = _prime_power(m // 2 - 1)
    if pp is not None and (m // 2 - 1) % 4 == 1:
        return ("paley2", m // 2 - 1)
    if _is_prime(m // 4) and _cyclotomic_gs_sets(m // 4) is not None:
        return ("goethals_seidel", m // 4)
    # Both Kronecker factors must be non-trivial base orders; powers of two are already split off.
    for a in range(12, math.isqrt(m) + 1, 4):
        b = m // a
        if m % a or b % 4 or not (a & (a - 1)) or not (b & (b - 1)):
            continue
        if _base_kind(a) and _base_kind(b):
            return ("kron", a, m // a)
    return None


@lru_cache(maxsize=None)
def _base_matrix(m: int) -> torch.Tensor:
    """H_m for a base order; cached, callers must not modify it."""
    kind = _base_kind(m)
    if kind[0] == "sylvester":
        h = _sylvester(m)
    elif kind[0] == "paley1":
        h = _paley1(kind[1])
    elif kind[0] == "paley2":
        h = _paley2(kind[1])
    elif kind[0] == "goethals_seidel":
        h = _goethals_seidel(kind[1])
    else:
        h = torch.kron(_base_matrix(kind[1]), _base_matrix(kind[2]))
    # Cheap for base orders and turns any construction bug into an error instead of a wrong rotation.
    if not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)):
        raise AssertionError(f"{kind} construction of H_{m} is not Hadamard")
    return h


@lru_cache(maxsize=None)
def _split(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with n = m * 2^k and H_m constructible, smallest m first; None if there is none."""
    k = (n & -n).bit_length() - 1  # number of trailing zero bits
    for j in range(k, -1, -1):
        m = n >> j
        if _base_kind(m) is not None:
            return m, 1 << j
    return None


def _factor_orders(m: int) -> list[tuple[int, bool]]:
    kind = _base_kind(m)
    if kind[0] == "kron":
        return _factor_orders(kind[1]) + _factor_orders(kind[2])
    return [(m, False)] if m > 1 else []


@lru_cache(maxsize=None)
def _plan(n: int) -> tuple[tuple[int, bool], ...]:
    """(order, is_sylvester) of the dense factors whose Kronecker product, in this order, is H_n."""
    m, pow2 = _split(n)
    bits = pow2.bit_length() - 1
    chunks = -(-bits // _MAX_POW2_BLOCK_BITS)
    sizes = [bits // chunks + (i < bits % chunks) for i in range(chunks)] if chunks else []
    return tuple(_factor_orders(m) + [(1 << b, True) for b in sizes])


# ----------------------------------------------------------------------------------------------
# public API


def has_hadamard(n) -> bool:
    """Whether hadamard_matrix(n) is supported."""
    try:
        n = _check_size(n)
    except HadamardSizeError:
        return False
    return _split(n) is not None


def hadamard_matrix(n: int) -> torch.Tensor:
    """n x n matrix of +-1 (float64, not normalized) with H H^T = n I; H = kron(H_m, H_{2^k})."""
    n = _check_size(n)
    split = _split(n)
    if split is None:
        raise _size_error(n)
    m, pow2 = split
    # The expensive part (the base construction) is lru-cached; the Kronecker product costs the same
    # as cloning a cached n x n matrix would, so every call returns a fresh tensor the caller owns.
    return _sylvester(pow2) if m == 1 else torch.kron(_base_matrix(m), _sylvester(pow2))


def construction(n: int) -> str:
    """How hadamard_matrix(n) is built, e.g. "H_28 (x) H_32" or "H_64" (Sylvester)."""
    split = _split(_check_size(n))
    if split is None:
        raise _size_error(n)
    m, pow2 = split
    return f"H_{m} (x) H_{pow2}" if m > 1 else f"H_{pow2}"


def orthonormal_hadamard(n: int) -> torch.Tensor:
    """H_n / sqrt(n), float64."""
    return hadamard_matrix(n) / math.sqrt(n)


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """(H_n / sqrt(n)) @ diag(D), D a +-1 vector drawn from torch.Generator seeded with seed (float64)."""
    h = orthonormal_hadamard(n)
    gen = torch.Generator().manual_seed(seed)
    d = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    return h * d


def kronecker_factors(n: int, max_inner: int = 128) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(outer, inner), +-1 matrices (float64), with kron(outer, inner) = hadamard_matrix(n); inner is the
    largest Sylvester block of at most max_inner that divides n's power-of-two part, outer is None when it
    would be 1x1. This is the split the fused quantizer kernel runs: inner on each block of that size, outer
    across the blocks."""
    n = _check_size(n)
    split = _split(n)
    if split is None:
        raise _size_error(n)
    m, pow2 = split
    inner = min(pow2, max_inner)
    outer = n // inner
    # kron(H_m, H_pow2) with H_pow2 = kron(H_{pow2/inner}, H_inner), both Sylvester
    return (None if outer == 1 else hadamard_matrix(outer) if m == 1 else
            torch.kron(_base_matrix(m), _sylvester(pow2 // inner))), _sylvester(inner)


_TRANSFORM_PLANS: dict[tuple, tuple[tuple[int, torch.Tensor, torch.Tensor], ...]] = {}


# Marked constant for torch.compile: a compiled caller (the fused quantizers, quant.py) embeds the factors of its
# sizes instead of tracing the number theory above, which dynamo would walk through on every compilation (it
# ignores lru_cache). A plain dict keeps the cache: dynamo would warn about an lru_cache even here.
@torch.compiler.assume_constant_result
def _transform_plan(n: int, device: torch.device, dtype: torch.dtype) -> tuple[tuple[int, torch.Tensor, torch.Tensor], ...]:
    """The dense factors whose Kronecker product, in this order, is H_n, as (order, H_f, H_f^T) on device/dtype;
    built once per key, so repeated transforms neither rebuild nor copy them."""
    key = (n, device, dtype)
    plan = _TRANSFORM_PLANS.get(key)
    if plan is None:
        if not has_hadamard(n):
            raise _size_error(n)
        factors = []
        for f, sylvester in _plan(n):
            h = (_sylvester(f) if sylvester else _base_matrix(f)).to(device=device, dtype=dtype)
            factors.append((f, h, h.T.contiguous()))
        plan = _TRANSFORM_PLANS[key] = tuple(factors)
    return plan


def hadamard_transform(x: torch.Tensor, n: int | None = None, transpose: bool = False) -> torch.Tensor:
    """x @ (H_n / sqrt(n)) along the last dimension without forming H_n; with transpose=True,
    x @ (H_n / sqrt(n))^T, the inverse transform.

    n defaults to x.shape[-1]; a smaller n dividing x.shape[-1] applies H_n to each contiguous block of
    n (block-diagonal kron(I, H_n)). Half/bfloat16 inputs are computed in float32 and cast back. A compiled
    caller passes n as a Python int (a module's attribute): dynamo traces x's widths as symbols, and the factors
    of H_n are looked up by the number.
    """
    if not (x.is_floating_point() and not x.is_complex()):
        raise TypeError(f"hadamard_transform needs a real floating tensor, got {x.dtype}")
    width = x.shape[-1] if x.dim() else 1
    n = width if n is None else _check_size(n)
    if width % n:
        raise ValueError(f"hadamard_transform: last dimension {width} is not a multiple of n={n}")
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    y = x.to(compute).reshape(-1, n)
    rows = y.shape[0]
    left, right = 1, n
    for f, h, ht in _transform_plan(n, x.device, compute):
        right //= f
        if transpose:  # kron(A, B)^T = kron(A^T, B^T): the same pass with each factor transposed
            h, ht = ht, h
        if right == 1:
            y = y.reshape(-1, f) @ h
        else:
            # y[r, i, j] <- sum_p H[p, i] y[r, p, j]: a batched matmul with H^T on the left
            y = torch.matmul(ht, y.reshape(rows * left, f, right))
        left *= f
    y = y.reshape(x.shape) * (1.0 / math.sqrt(n))
    return y.to(x.dtype)


def hadamard_across_groups(x: torch.Tensor, groups: int, transpose: bool = False) -> torch.Tensor:
    """x @ kron(H_groups / sqrt(groups), I) along the last dimension, cut into `groups` contiguous blocks:
    entry j of every block is mixed with entry j of the others (QuaRot's online Hadamard across attention
    heads at the o_proj input). transpose=True applies the inverse."""
    width = x.shape[-1]
    if width % groups:
        raise ValueError(f"hadamard_across_groups: last dimension {width} is not a multiple of groups={groups}")
    blocks = x.reshape(*x.shape[:-1], groups, width // groups).transpose(-1, -2)
    return hadamard_transform(blocks, groups, transpose=transpose).transpose(-1, -2).reshape(x.shape)

