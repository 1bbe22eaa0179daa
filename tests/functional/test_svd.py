"""Truncated and randomized SVD: Eckart–Young, balanced factors, factored targets, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorsum.functional import (
    FactoredSum,
    balanced_factors,
    best_rank_r,
    gram_truncated_svd,
    randomized_svd,
    truncated_svd,
)
from tests import reference as ref
from tests.utils import randn, with_spectrum


def test_best_rank_r_matches_the_float64_oracle_and_its_residual():
    M = randn(20, 12, seed=1)
    P = best_rank_r(M, 3)
    assert ref.rel_err(P, ref.best_rank(M, 3)) <= 1e-12
    S = torch.linalg.svdvals(M)
    assert abs(float((M - P).norm()) - float(S[3:].norm())) <= 1e-10  # Eckart–Young


def test_rank_above_the_size_keeps_everything():
    M = randn(5, 4, seed=2)
    U, S, Vh = truncated_svd(M, 10)
    assert S.shape == (4,)
    assert ref.rel_err((U * S) @ Vh, M) <= 1e-12


@pytest.mark.parametrize("rank", [1, 3, 9])
def test_a_stack_is_decomposed_as_each_of_its_matrices(rank):
    stack = torch.stack([randn(9, 7, seed=seed) for seed in range(4)])
    U, S, Vh = truncated_svd(stack, rank)
    B, A = balanced_factors(U, S, Vh)
    for i, M in enumerate(stack):
        assert ref.rel_err(B[i] @ A[i], ref.best_rank(M, rank)) <= 1e-12
        u, s, vh = truncated_svd(M, rank)
        torch.testing.assert_close(S[i], s, rtol=1e-12, atol=0)
        b, a = balanced_factors(u, s, vh)
        torch.testing.assert_close(B[i] @ A[i], b @ a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("factored", [False, True])
def test_a_randomized_stack_is_sketched_as_each_of_its_matrices(factored):
    # The same probes for every member: each member's result is what it gets alone.
    Ps = torch.stack([randn(30, 4, seed=seed) for seed in range(3)])
    Qs = torch.stack([randn(4, 20, seed=10 + seed) for seed in range(3)])
    stack = FactoredSum.from_terms([(Ps, Qs)], [1.0], (30, 20), batch=(3,))
    target = stack if factored else stack.to_dense()
    U, S, Vh = randomized_svd(target, 3, generator=torch.Generator().manual_seed(5))
    for i in range(3):
        alone = FactoredSum.from_terms([(Ps[i], Qs[i])], [1.0], (30, 20))
        u, s, vh = randomized_svd(
            alone if factored else alone.to_dense(), 3, generator=torch.Generator().manual_seed(5)
        )
        torch.testing.assert_close(S[i], s, rtol=1e-10, atol=0)
        torch.testing.assert_close((U[i] * S[i]) @ Vh[i], (u * s) @ vh, rtol=1e-10, atol=1e-12)
        assert ref.rel_err((U[i] * S[i]) @ Vh[i], ref.best_rank(Ps[i] @ Qs[i], 3)) <= 1e-10


def test_balanced_factors_reproduce_the_projection_with_equal_gram_matrices():
    B, A = balanced_factors(*truncated_svd(randn(9, 7, seed=3), 3))
    assert ref.rel_err(B @ A, ref.best_rank(randn(9, 7, seed=3), 3)) <= 1e-12
    torch.testing.assert_close(B.T @ B, A @ A.T)


def test_low_precision_input_is_decomposed_in_float32_and_returned_in_its_dtype():
    U, S, Vh = truncated_svd(randn(8, 6, seed=4).bfloat16(), 2)
    assert U.dtype == S.dtype == Vh.dtype == torch.bfloat16


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    rank=st.integers(1, 30),
    stack=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_the_gram_route_gives_the_svds_projection_and_singular_values(m, n, rank, stack, seed):
    M = torch.stack([randn(m, n, seed=seed + i) for i in range(stack)])
    U, S, Vh = gram_truncated_svd(M, rank)
    k = min(rank, m, n)
    assert (U.shape, S.shape, Vh.shape) == ((stack, m, k), (stack, k), (stack, k, n))
    _, s, _ = truncated_svd(M, rank)
    # Singular values to float64's accuracy on the squared scale: ε₆₄ σ₁² / σ.
    torch.testing.assert_close(S, s, rtol=0, atol=1e-12 * float(s.max()) + 1e-15)
    scale = float(s.max()) + 1e-300
    # The side found by division errs by about ε₆₄ (σ₁/σ_k)²: the Gram matrix's conditioning.
    conditioning = float((s.max(-1).values / s.min(-1).values.clamp_min(1e-300)).max()) ** 2
    tolerance = min(1e-12 * conditioning + 1e-10, 1.0)
    for i in range(stack):
        # The projection is unique where σ_k > σ_{k+1}: Gaussian matrices have that gap.
        assert ref.rel_err((U[i] * S[i]) @ Vh[i], ref.best_rank(M[i], rank)) <= 1e-9
        # Triplets, not just their product: M vᵢ = σᵢ uᵢ and Mᵀ uᵢ = σᵢ vᵢ, unit vectors.
        atol = tolerance * scale
        torch.testing.assert_close(M[i] @ Vh[i].T, U[i] * S[i], rtol=0, atol=atol)
        torch.testing.assert_close(M[i].T @ U[i], Vh[i].T * S[i], rtol=0, atol=atol)
        eye = torch.eye(k, dtype=M.dtype)
        torch.testing.assert_close(U[i].T @ U[i], eye, rtol=0, atol=tolerance)
        torch.testing.assert_close(Vh[i] @ Vh[i].T, eye, rtol=0, atol=tolerance)


def test_the_gram_route_holds_a_wide_spectrum_closer_than_a_float32_svd():
    # Singular values from 1 down to 1e-4: float64 inside absorbs the squared condition number,
    # so the float32 result is as close to the truth as float32 rounding allows.
    sv = torch.logspace(0, -4, 12, dtype=torch.float64)
    P, Q = with_spectrum(60, 40, sv, seed=7)
    M = (P @ Q).float()
    truth = ref.best_rank(M.double(), 6)
    U, S, Vh = gram_truncated_svd(M, 6)
    u, s, vh = truncated_svd(M, 6)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    gram_error = ref.rel_err(((U * S) @ Vh).double(), truth)
    assert gram_error <= 1e-6
    assert gram_error <= ref.rel_err(((u * s) @ vh).double(), truth) * 1.5


def test_the_gram_route_of_a_zero_matrix_is_zero_without_nan():
    for shape in [(6, 4), (4, 6)]:
        U, S, Vh = gram_truncated_svd(torch.zeros(shape, dtype=torch.float64), 2)
        assert torch.equal(S, torch.zeros(2, dtype=torch.float64))
        assert torch.equal((U * S) @ Vh, torch.zeros(shape, dtype=torch.float64))
        assert torch.isfinite(U).all()
        assert torch.isfinite(Vh).all()


def test_the_gram_route_fails_loudly_on_a_non_finite_matrix():
    M = randn(6, 4, seed=8)
    M[0, 0] = float("nan")
    with pytest.raises(torch.linalg.LinAlgError):
        gram_truncated_svd(M, 2)


@pytest.mark.parametrize("factored", [False, True])
def test_randomized_svd_recovers_a_decaying_spectrum(factored):
    sv = 0.5 ** torch.arange(30, dtype=torch.float64)
    P, Q = with_spectrum(120, 80, sv, seed=5)
    target = FactoredSum.from_terms([(P, Q)], [1.0], (120, 80)) if factored else P @ Q
    g = torch.Generator().manual_seed(0)
    U, S, Vh = randomized_svd(target, 5, oversamples=10, power_iters=2, generator=g)
    assert ref.rel_err(S, sv[:5]) <= 1e-10
    assert ref.rel_err((U * S) @ Vh, ref.best_rank(P @ Q, 5)) <= 1e-8


def test_randomized_svd_is_deterministic_for_a_seeded_generator():
    M = randn(40, 30, seed=6)
    first = randomized_svd(M, 4, generator=torch.Generator().manual_seed(1))
    second = randomized_svd(M, 4, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: truncated_svd(randn(3, 3, seed=0), 0), ValueError, r"Invalid rank: 0"),
        (
            lambda: truncated_svd(torch.ones(2, 3, 4, 5), 1),
            ValueError,
            r"M must be a matrix \(m, n\) or a stack of them \(G, m, n\), got shape \(2, 3, 4, 5\)",
        ),
        (lambda: gram_truncated_svd(randn(3, 3, seed=0), 0), ValueError, r"Invalid rank: 0"),
        (
            lambda: gram_truncated_svd(torch.ones(3), 1),
            ValueError,
            r"M must be a matrix \(m, n\) or a stack of them \(G, m, n\), got shape \(3,\)",
        ),
        (
            lambda: best_rank_r(torch.ones(3, 4, 5), 1),
            ValueError,
            r"M must be a matrix \(2-d\), got shape \(3, 4, 5\)",
        ),
        (
            lambda: best_rank_r(torch.ones(3), 1),
            ValueError,
            r"M must be a matrix \(2-d\), got shape \(3,\)",
        ),
        (
            lambda: randomized_svd(randn(3, 3, seed=0), 1, oversamples=-1),
            ValueError,
            r"Invalid oversamples: -1",
        ),
        (
            lambda: randomized_svd(randn(3, 3, seed=0), 1, power_iters=1.5),
            ValueError,
            r"Invalid power_iters: 1.5",
        ),
        (
            lambda: randomized_svd("M", 1),
            TypeError,
            r"target must be a Tensor or FactoredSum, got str",
        ),
        (
            lambda: randomized_svd(FactoredSum((), (), (3, 3)), 1),
            ValueError,
            r"target is an empty FactoredSum",
        ),
    ],
)
def test_invalid_arguments_raise_with_the_offending_values(call, error, match):
    with pytest.raises(error, match=match):
        call()
