"""LoRSum's ALS core against float64 dense oracles: descent, Eckart–Young optimality, exact
recovery, the Riemannian / Gauss–Seidel closed forms, the B = 0 start, gauges, metrics, dtypes,
the absence of m × n allocations, early stopping and every input error."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lorsum.functional import lorsum, lorsum_iterates
from tests import reference as ref
from tests.utils import lora_problem, orthonormal, randn, well_conditioned, with_spectrum

DAMPINGS = [0.0, 1e-3, 0.5]


def lora_terms(B0, A0, X, S, lr):
    return [(B0, A0), (S.T, X)], [1.0, -lr]


# --- a hand-computed case ------------------------------------------------------------------------


def test_two_by_two_rank_one_matches_hand_computation():
    # T = diag(2, 1), B0 = [1, 1]ᵀ, A0 = [1, 1], λ = 1:
    # A = (B0ᵀB0 + 1)⁻¹ (B0ᵀT + A0) = ([2, 1] + [1, 1]) / 3 = [1, 2/3]
    # B = (T Aᵀ + B0)(A Aᵀ + 1)⁻¹ = [3, 5/3] / (22/9) = [27/22, 15/22]
    T = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    B0 = torch.ones(2, 1, dtype=torch.float64)
    A0 = torch.ones(1, 2, dtype=torch.float64)
    B, A = lorsum([T], [1.0], (B0, A0), num_iters=1, damping=1.0)
    torch.testing.assert_close(A, torch.tensor([[1.0, 2.0 / 3.0]], dtype=torch.float64))
    torch.testing.assert_close(B, torch.tensor([[27.0 / 22.0], [15.0 / 22.0]], dtype=torch.float64))


# --- descent and optimality ----------------------------------------------------------------------


def _targets(kind: str, m: int, n: int, seed: int):
    """``T`` with singular values 10, 9, 8, 7, a gap, then 2 ... 0.5: as pairs, dense or mixed."""
    sv = torch.cat([torch.tensor([10.0, 9.0, 8.0, 7.0]), torch.linspace(2.0, 0.5, 8)])
    P, Q = with_spectrum(m, n, sv, seed=seed)
    if kind == "pairs":  # split into two pairs of different inner sizes
        return [(P[:, :5], Q[:5]), (P[:, 5:], Q[5:])], [1.0, 1.0]
    if kind == "dense":
        return [P @ Q], [1.0]
    return [(P[:, :5], Q[:5]), 2.0 * (P[:, 5:] @ Q[5:])], [1.0, 0.5]


@pytest.mark.parametrize("kind", ["pairs", "dense", "mixed"])
@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("metric", [False, True])
def test_each_half_step_never_increases_the_objective(kind, damping, metric):
    m, n, r = 30, 20, 4
    terms, weights = _targets(kind, m, n, seed=1)
    T = ref.dense_target(terms, weights)
    init = (randn(m, r, seed=2), randn(r, n, seed=3))
    metrics = {}
    if metric:  # a diagonal output metric and a dense SPD input metric
        L = randn(n, n, seed=4)
        metrics = {
            "metric_out": randn(m, seed=5).abs() + 0.1,
            "metric_in": L @ L.T / n + 0.1 * torch.eye(n, dtype=torch.float64),
        }
    values = [ref.objective(*init, T, init, damping, **metrics)]
    for B, A in lorsum_iterates(terms, weights, init, num_iters=16, damping=damping, **metrics):
        values.append(ref.objective(B, A, T, init, damping, **metrics))
    scale = float(T.norm()) ** 2
    for k, (before, after) in enumerate(itertools.pairwise(values)):
        assert after <= before * (1 + 1e-12) + 1e-13 * scale, (
            f"half-step {k} raised the objective from {before!r} to {after!r}"
        )


@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    r=st.integers(1, 24),
    N=st.integers(1, 12),
    damping=st.sampled_from([0.0, 1e-8, 1e-3, 1.0, 100.0]),
    num_iters=st.integers(1, 4),
    dense_gradient=st.booleans(),
    diagonal_metric=st.booleans(),
    zero_B=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzzed_problems_descend_and_keep_shapes_and_dtypes(
    m, n, r, N, damping, num_iters, dense_gradient, diagonal_metric, zero_B, seed
):
    r = min(r, m, n)
    B0, A0, X, S = lora_problem(m, n, r, N, seed=seed)
    if zero_B:
        B0 = torch.zeros_like(B0)
    gradient = S.T @ X if dense_gradient else (S.T, X)
    terms, weights = [(B0, A0), gradient], [1.0, -0.1]
    metrics = {}
    if diagonal_metric:
        metrics = {
            "metric_out": randn(m, seed=seed).abs() + 0.1,
            "metric_in": randn(n, seed=seed + 1).abs() + 0.1,
        }
    T = ref.dense_target(terms, weights)
    previous = ref.objective(B0, A0, T, (B0, A0), damping, **metrics)
    scale = float(T.norm()) ** 2 + float(B0.norm()) ** 2 + float(A0.norm()) ** 2
    for B, A in lorsum_iterates(
        terms, weights, (B0, A0), num_iters=num_iters, damping=damping, **metrics
    ):
        assert (B.shape, A.shape, B.dtype, A.dtype) == (B0.shape, A0.shape, B0.dtype, A0.dtype)
        assert torch.isfinite(B).all()
        assert torch.isfinite(A).all()
        value = ref.objective(B, A, T, (B0, A0), damping, **metrics)
        # 1e-10 of the problem's scale: rounding in the normal equations of random (possibly
        # ill-conditioned) factors, far below any real increase.
        assert value <= previous + 1e-10 * scale, f"objective rose from {previous!r} to {value!r}"
        previous = value


@pytest.mark.parametrize("kind", ["pairs", "dense", "mixed"])
def test_many_undamped_sweeps_reach_the_eckart_young_optimum(kind):
    m, n, r = 40, 25, 4
    terms, weights = _targets(kind, m, n, seed=7)
    T = ref.dense_target(terms, weights)
    optimum = float((T - ref.best_rank(T, r)).norm())
    B, A = lorsum(terms, weights, (randn(m, r, seed=8), randn(r, n, seed=9)), num_iters=20)
    excess = (float((B @ A - T).norm()) - optimum) / optimum
    assert excess <= 1e-6, f"relative excess residual {excess:.3e} > 1e-6 after 20 sweeps"
    assert ref.rel_err(B @ A, ref.best_rank(T, r)) <= 1e-6


def test_lora_step_sweeps_converge_to_the_svd_projection_of_the_full_step():
    # The factored LoRA target B0A0 − lr SᵀX, never given densely, with tiny damping.
    B0, A0, X, S = lora_problem(50, 35, 3, 80, seed=11)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.05)
    T = ref.dense_target(terms, weights)
    B, A = lorsum(terms, weights, (B0, A0), num_iters=300, damping=1e-12)
    optimum = float((T - ref.best_rank(T, 3)).norm())
    excess = (float((B @ A - T).norm()) - optimum) / optimum
    assert excess <= 1e-6, f"relative excess residual {excess:.3e}"


@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    r=st.integers(1, 24),
    k=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_a_target_of_rank_at_most_r_is_recovered_exactly(m, n, r, k, seed):
    # Exact in exact arithmetic once col(B0) meets col(T) in general position. In floating point
    # the first A = B0⁺T has condition number up to κ(B0)κ(T)/c, with c the cosine of the
    # largest principal angle between col(B0) and col(T); undamped ALS keeps that gauge, and its
    # normal equations amplify rounding by the square. So: factors with κ <= 2
    # (tests.utils.well_conditioned) and c >= 0.05, which bound the amplification by ~1e4.
    r = min(r, m, n)
    k = min(k, r)  # rank of the target
    T_pair = (well_conditioned(m, k, seed=seed), well_conditioned(k, n, seed=seed + 2))
    init = (well_conditioned(m, r, seed=seed + 4), well_conditioned(r, n, seed=seed + 6))
    cosines = torch.linalg.svdvals(torch.linalg.qr(init[0]).Q.T @ torch.linalg.qr(T_pair[0]).Q)
    assume(float(cosines.min()) >= 0.05)
    B, A = lorsum([T_pair], [1.0], init, num_iters=2)
    T = T_pair[0] @ T_pair[1]
    assert ref.rel_err(B @ A, T) <= 1e-10


def _first_solve_condition(B0, T) -> float:
    """κ of the first undamped A-solve ``B0⁺T``: the factor through which rounding is amplified.

    Undamped ALS solves normal equations, so its rounding error grows like this κ squared, and
    the gauge it fixes persists over the sweeps. Property tests that claim exactness therefore
    draw inits in general position (κ <= 100) and say so, instead of loosening their bounds.
    """
    A1 = torch.linalg.lstsq(B0, T).solution
    return float(torch.linalg.cond(A1)) if min(A1.shape) > 1 else 1.0


@given(m=st.integers(1, 24), n=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_full_rank_gives_the_dense_step_itself(m, n, seed):
    r = min(m, n)
    _, _, X, S = lora_problem(m, n, r, 7, seed=seed)
    B0, A0 = well_conditioned(m, r, seed=seed), well_conditioned(r, n, seed=seed + 2)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.3)
    T = ref.dense_target(terms, weights)
    assume(_first_solve_condition(B0, T) <= 100)
    B, A = lorsum(terms, weights, (B0, A0), num_iters=1)
    assert ref.rel_err(B @ A, T) <= 1e-10


# --- the closed forms of one step ----------------------------------------------------------------


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize(
    ("num_iters", "closed_form"),
    [(0, ref.riemannian_step), (1, ref.gauss_seidel_sweep)],
    ids=["jacobi-is-riemannian", "one-sweep-is-gauss-seidel"],
)
def test_one_step_equals_its_closed_form(num_iters, closed_form, damping):
    # num_iters = 0: A1 = A0 − lr(B0ᵀB0 + λI)⁻¹B0ᵀG, B1 = B0 − lr G A0ᵀ(A0A0ᵀ + λI)⁻¹ (both from
    # the init); num_iters = 1: the same A1, then B1 = (λB0 + T A1ᵀ)(A1A1ᵀ + λI)⁻¹.
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=21)
    lr = 0.07
    B, A = lorsum(*lora_terms(B0, A0, X, S, lr), (B0, A0), num_iters=num_iters, damping=damping)
    B1, A1 = closed_form(B0, A0, S.T @ X, lr, damping)
    assert ref.rel_err(A, A1) <= 1e-10
    assert ref.rel_err(B, B1) <= 1e-10


@pytest.mark.parametrize("num_iters", [0, 1, 3])
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_lora_start_with_zero_B_is_finite_and_matches_the_oracle(num_iters, damping):
    m, n, r = 30, 20, 4
    _, A0, X, S = lora_problem(m, n, r, 50, seed=23)
    B0 = torch.zeros(m, r, dtype=torch.float64)
    lr = 0.1
    G = S.T @ X
    terms, weights = lora_terms(B0, A0, X, S, lr)
    B, A = lorsum(terms, weights, (B0, A0), num_iters=num_iters, damping=damping)
    assert torch.isfinite(B).all()
    assert torch.isfinite(A).all()
    # The A-solve sees nothing (B0 = 0) and keeps A0; the B-solve projects −lr G onto row(A0).
    eye = torch.eye(r, dtype=torch.float64)
    B1 = -lr * torch.linalg.solve(A0 @ A0.T + damping * eye, (G @ A0.T).T).T
    if num_iters <= 1:
        assert ref.rel_err(A, A0) <= 1e-12
        assert ref.rel_err(B, B1) <= 1e-10
    else:  # later sweeps continue from (B1, A0) with the anchor still at (0, A0)
        rest = lorsum_iterates(terms, weights, (B0, A0), num_iters=num_iters, damping=damping)
        *_, (B_last, _A_last) = rest
        torch.testing.assert_close(B, B_last, rtol=0, atol=0)
        assert ref.objective(B, A, -lr * G, (B0, A0), damping) < ref.objective(
            B1, A0, -lr * G, (B0, A0), damping
        )


def test_undamped_solve_is_the_limit_of_vanishing_damping():
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=24)
    B0[:, 1] = 0.0  # a rank-deficient B0: the limit must keep A0 along the missing direction
    terms, weights = lora_terms(B0, A0, X, S, lr=0.1)
    B, A = lorsum(terms, weights, (B0, A0), num_iters=2, damping=0.0)
    B_eps, A_eps = lorsum(terms, weights, (B0, A0), num_iters=2, damping=1e-9)
    assert ref.rel_err(A, A_eps) <= 1e-6
    assert ref.rel_err(B, B_eps) <= 1e-6


# --- invariances ---------------------------------------------------------------------------------


@given(m=st.integers(2, 24), n=st.integers(2, 24), r=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_gauge_change_of_the_init_gives_the_same_product_without_damping(m, n, r, seed):
    r = min(r, m, n)
    B0, A0, X, S = lora_problem(m, n, r, 9, seed=seed)
    R = torch.eye(r, dtype=torch.float64) + 0.5 * randn(r, r, seed=seed + 5) / r**0.5
    terms, weights = lora_terms(B0, A0, X, S, lr=0.2)  # the target keeps the original product
    # General position (see _first_solve_condition): rounding grows like κ(A1)²·κ(R)².
    assume(float(torch.linalg.cond(R)) <= 10)
    assume(_first_solve_condition(B0, ref.dense_target(terms, weights)) <= 100)
    B, A = lorsum(terms, weights, (B0, A0), num_iters=1)
    B_g, A_g = lorsum(terms, weights, (B0 @ R, torch.linalg.solve(R, A0)), num_iters=1)
    assert ref.rel_err(B_g @ A_g, B @ A) <= 1e-8


@pytest.mark.parametrize("num_iters", [0, 1, 3])
def test_orthogonal_gauge_is_equivariant_with_damping(num_iters):
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=31)
    Q = orthonormal(4, 4, seed=32)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.1)
    B, A = lorsum(terms, weights, (B0, A0), num_iters=num_iters, damping=0.3)
    B_q, A_q = lorsum(terms, weights, (B0 @ Q.T, Q @ A0), num_iters=num_iters, damping=0.3)
    assert ref.rel_err(B_q, B @ Q.T) <= 1e-10
    assert ref.rel_err(A_q, Q @ A) <= 1e-10


@given(scale=st.floats(-50, 50).filter(lambda c: abs(c) > 1e-3), seed=st.integers(0, 2**16))
def test_scaling_every_term_scales_the_fitted_product(scale, seed):
    B0, A0, X, S = lora_problem(12, 9, 3, 10, seed=seed)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.4)
    B, A = lorsum(terms, weights, (B0, A0), num_iters=3)
    B_c, A_c = lorsum(terms, [scale * w for w in weights], (B0, A0), num_iters=3)
    assert ref.rel_err(B_c @ A_c, scale * (B @ A)) <= 1e-8


@pytest.mark.parametrize("num_iters", [0, 1, 4])
def test_zero_gradient_with_damping_leaves_the_factors_unchanged(num_iters):
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=33)
    terms, weights = lora_terms(B0, A0, X, torch.zeros_like(S), lr=0.1)
    B, A = lorsum(terms, weights, (B0, A0), num_iters=num_iters, damping=1e-2)
    assert ref.rel_err(B, B0) <= 1e-12
    assert ref.rel_err(A, A0) <= 1e-12


def test_the_result_depends_on_the_terms_only_through_their_sum():
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=34)
    G = S.T @ X
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    forms = {
        "(S^T, X)": ([(B0, A0), (S.T, X)], [1.0, -0.1]),
        "dense G": ([(B0, A0), G], [1.0, -0.1]),
        "(G, I)": ([(B0, A0), (G, torch.eye(20, dtype=torch.float64))], [1.0, -0.1]),
        "row blocks": ([(B0, A0), (S[:20].T, X[:20]), (S[20:].T, X[20:])], [1.0, -0.1, -0.1]),
        "permuted rows": ([(B0, A0), (S[perm].T, X[perm])], [1.0, -0.1]),
        "zero-weight extra": ([(B0, A0), (S.T, X), (S.T, X)], [1.0, -0.1, 0.0]),
        "halved copies": ([(B0, A0), (S.T, X), (S.T, X)], [1.0, -0.05, -0.05]),
    }
    B, A = lorsum(*forms["(S^T, X)"], (B0, A0), num_iters=2, damping=1e-3)
    for name, (terms, weights) in forms.items():
        B_f, A_f = lorsum(terms, weights, (B0, A0), num_iters=2, damping=1e-3)
        assert ref.rel_err(B_f, B) <= 1e-10, name
        assert ref.rel_err(A_f, A) <= 1e-10, name


def test_tensor_weights_equal_float_weights():
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=35)
    B, A = lorsum([(B0, A0), (S.T, X)], [1.0, -0.1], (B0, A0), num_iters=2)
    lr = torch.tensor(0.1, dtype=torch.float64)
    B_t, A_t = lorsum([(B0, A0), (S.T, X)], [torch.tensor(1.0), -lr], (B0, A0), num_iters=2)
    torch.testing.assert_close(B_t, B)
    torch.testing.assert_close(A_t, A)


def test_an_empty_sum_is_fitted_by_a_zero_product():
    B0, A0 = randn(6, 2, seed=36), randn(2, 5, seed=37)
    B, A = lorsum([], [], (B0, A0), num_iters=1)
    assert float((B @ A).abs().max()) == 0.0


# --- metrics -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_iters", [0, 1, 3])
def test_a_diagonal_metric_of_ones_equals_the_unscaled_problem(num_iters):
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=41)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.1)
    B, A = lorsum(terms, weights, (B0, A0), num_iters=num_iters, damping=1e-2)
    ones = {
        "metric_out": torch.ones(30, dtype=torch.float64),
        "metric_in": torch.ones(20, dtype=torch.float64),
    }
    B_m, A_m = lorsum(terms, weights, (B0, A0), num_iters=num_iters, damping=1e-2, **ones)
    assert ref.rel_err(B_m, B) <= 1e-12
    assert ref.rel_err(A_m, A) <= 1e-12


def test_a_vector_metric_equals_its_diagonal_matrix():
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=42)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.1)
    d_out, d_in = randn(30, seed=43).abs() + 0.2, randn(20, seed=44).abs() + 0.2
    B, A = lorsum(
        terms, weights, (B0, A0), num_iters=2, damping=0.1, metric_out=d_out, metric_in=d_in
    )
    B_d, A_d = lorsum(
        terms,
        weights,
        (B0, A0),
        num_iters=2,
        damping=0.1,
        metric_out=torch.diag(d_out),
        metric_in=torch.diag(d_in),
    )
    assert ref.rel_err(B_d, B) <= 1e-10
    assert ref.rel_err(A_d, A) <= 1e-10


def _spd(size: int, seed: int):
    L = randn(size, size, seed=seed)
    return L @ L.T / size + 0.3 * torch.eye(size, dtype=torch.float64)


@pytest.mark.parametrize("damping", [0.0, 0.2])
def test_dense_metric_half_steps_are_exact_block_minimisers(damping):
    # Stationarity of the metric-weighted objective in the block just solved, by autograd on the
    # dense float64 objective: an oracle independent of the normal equations lorsum solves.
    m, n, r = 16, 12, 3
    B0, A0, X, S = lora_problem(m, n, r, 20, seed=45)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.1)
    T = ref.dense_target(terms, weights)
    Mo, Mi = _spd(m, 46), _spd(n, 47)
    it = lorsum_iterates(
        terms, weights, (B0, A0), num_iters=3, damping=damping, metric_out=Mo, metric_in=Mi
    )
    for k, (B, A) in enumerate(it):
        B, A = B.clone().requires_grad_(), A.clone().requires_grad_()
        f = _objective_tensor(B, A, T, (B0, A0), damping, Mo, Mi)
        gB, gA = torch.autograd.grad(f, (B, A))
        solved = gA if k % 2 == 0 else gB
        assert float(solved.norm()) <= 1e-9 * float(f.detach().abs().sqrt() + 1), f"half-step {k}"


def _objective_tensor(B, A, T, init, damping, Mo, Mi):
    R = B @ A - T
    prox = torch.trace((B - init[0]).T @ Mo @ (B - init[0])) + torch.trace(
        (A - init[1]) @ Mi @ (A - init[1]).T
    )
    return 0.5 * torch.trace(Mo @ R @ Mi @ R.T) + 0.5 * damping * prox


def test_dense_metric_sweeps_reach_the_weighted_eckart_young_optimum():
    m, n, r = 24, 18, 3
    terms, weights = _targets("pairs", m, n, seed=48)
    T = ref.dense_target(terms, weights)
    Mo, Mi = _spd(m, 49), _spd(n, 50)
    B, A = lorsum(
        terms,
        weights,
        (randn(m, r, seed=51), randn(r, n, seed=52)),
        num_iters=400,
        metric_out=Mo,
        metric_in=Mi,
    )
    assert ref.rel_err(B @ A, ref.weighted_best_rank(T, r, Mo, Mi)) <= 1e-6


# --- dtypes and devices --------------------------------------------------------------------------


def test_float32_matches_the_float64_oracle():
    # Well-conditioned Gaussian data, m = 30, n = 20, r = 4: κ(B0ᵀB0) ≈ 4, so ε₃₂ √n suffices.
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=61)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.05)
    B64, A64 = lorsum(terms, weights, (B0, A0), num_iters=2, damping=1e-2)
    f32 = [t.float() for t in (B0, A0, X, S)]
    B32, A32 = lorsum(*lora_terms(*f32, lr=0.05), (f32[0], f32[1]), num_iters=2, damping=1e-2)
    assert (B32.dtype, A32.dtype) == (torch.float32, torch.float32)
    assert ref.rel_err(B32, B64) <= 1e-5
    assert ref.rel_err(A32, A64) <= 1e-5


def test_bfloat16_factors_come_back_in_bfloat16_no_worse_than_rounding_the_oracle():
    bf = [t.bfloat16() for t in lora_problem(30, 20, 4, 50, seed=62)]
    B, A = lorsum(*lora_terms(*bf, lr=0.05), (bf[0], bf[1]), num_iters=2, damping=1e-2)
    assert (B.dtype, A.dtype) == (torch.bfloat16, torch.bfloat16)
    # Oracle: the same bf16-rounded inputs in float64. The fp32 arithmetic error (~1e-6) is far
    # below bf16 rounding (~4e-3), so the output error is that one rounding: k = 2 leaves room
    # for values that round to the other side of a bf16 tie.
    B64, A64 = lorsum(
        *lora_terms(*[t.double() for t in bf], lr=0.05),
        (bf[0].double(), bf[1].double()),
        num_iters=2,
        damping=1e-2,
    )
    assert ref.rel_err(B, B64) <= 2 * ref.rel_err(B64.bfloat16(), B64)
    assert ref.rel_err(A, A64) <= 2 * ref.rel_err(A64.bfloat16(), A64)


def test_each_factor_keeps_its_own_dtype_and_compute_dtype_is_honoured():
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=63)
    terms, weights = lora_terms(B0.float(), A0.float(), X.float(), S.float(), lr=0.05)
    B, A = lorsum(
        terms, weights, (B0.float(), A0.bfloat16()), num_iters=1, compute_dtype=torch.float64
    )
    assert (B.dtype, A.dtype) == (torch.float32, torch.bfloat16)


def test_non_contiguous_inputs_give_the_same_result():
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=64)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.05)
    B, A = lorsum(terms, weights, (B0, A0), num_iters=2, damping=1e-3)
    Bt, At = B0.T.contiguous().T, A0.T.contiguous().T  # same values, transposed strides
    terms_t = [(Bt, At), (S.T.contiguous().T.T, X.T.contiguous().T)]
    B_t, A_t = lorsum(terms_t, weights, (Bt, At), num_iters=2, damping=1e-3)
    assert ref.rel_err(B_t, B) <= 1e-12
    assert ref.rel_err(A_t, A) <= 1e-12


# --- no m × n allocation -------------------------------------------------------------------------


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.numels.append((str(func), leaf.numel()))
        return out


@pytest.mark.parametrize("num_iters", [0, 1, 3])
@pytest.mark.parametrize("metric", ["none", "diagonal"])
def test_no_tensor_of_size_m_by_n_is_ever_allocated(num_iters, metric):
    m, n, r, N = 200, 150, 4, 16  # largest legitimate tensor: X or S, 16 · 200 < m · n / 9
    B0, A0, X, S = lora_problem(m, n, r, N, seed=71, dtype=torch.float32)
    kwargs = {}
    if metric == "diagonal":
        kwargs = {"metric_out": torch.rand(m) + 0.5, "metric_in": torch.rand(n) + 0.5}
    with _ShapeRecorder() as recorder:
        lorsum(
            *lora_terms(B0, A0, X, S, lr=0.1), (B0, A0), num_iters=num_iters, damping=1e-3, **kwargs
        )
    largest = max(recorder.numels, key=lambda item: item[1])
    assert largest[1] < m * n // 9, f"{largest[0]} produced {largest[1]} elements (m·n = {m * n})"


def test_runs_at_a_size_where_the_dense_step_cannot_fit():
    m = n = 2**17  # a dense float32 m × n matrix would need 64 GiB
    g = torch.Generator().manual_seed(72)
    B0, A0 = torch.randn(m, 4, generator=g), torch.randn(4, n, generator=g)
    X, S = torch.randn(16, n, generator=g), torch.randn(16, m, generator=g)
    B, A = lorsum([(B0, A0), (S.T, X)], [1.0, -1e-3], (B0, A0), num_iters=2, damping=1e-3)
    assert B.shape == (m, 4)
    assert A.shape == (4, n)
    assert torch.isfinite(B).all()
    assert torch.isfinite(A).all()


# --- iterates and early stopping -----------------------------------------------------------------


def test_iterates_yield_every_half_step_and_end_at_the_result():
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=81)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.1)
    iterates = list(lorsum_iterates(terms, weights, (B0, A0), num_iters=3, damping=1e-2))
    assert len(iterates) == 6
    assert torch.equal(iterates[0][0], B0)  # the A-solve leaves B untouched
    B, A = lorsum(terms, weights, (B0, A0), num_iters=3, damping=1e-2)
    assert torch.equal(iterates[-1][0], B)
    assert torch.equal(iterates[-1][1], A)
    (jacobi,) = lorsum_iterates(terms, weights, (B0, A0), num_iters=0, damping=1e-2)
    B_j, A_j = lorsum(terms, weights, (B0, A0), num_iters=0, damping=1e-2)
    assert torch.equal(jacobi[0], B_j)
    assert torch.equal(jacobi[1], A_j)


def test_tol_stops_after_the_first_sweep_whose_change_is_small():
    B0, A0, X, S = lora_problem(30, 20, 4, 50, seed=82)
    terms, weights = lora_terms(B0, A0, X, S, lr=0.1)
    tol = 1e-4
    pairs = list(lorsum_iterates(terms, weights, (B0, A0), num_iters=60))[1::2]  # after B-solves
    previous = [(B0, A0), *pairs]
    stop = next(
        k
        for k, ((B, A), (Bp, Ap)) in enumerate(zip(pairs, previous, strict=False), start=1)
        if max(ref.rel_err(A, Ap), ref.rel_err(B, Bp)) < tol
    )
    assert 1 < stop < 60
    B, A = lorsum(terms, weights, (B0, A0), num_iters=60, tol=tol)
    assert torch.equal(B, pairs[stop - 1][0])
    assert torch.equal(A, pairs[stop - 1][1])


# --- input errors --------------------------------------------------------------------------------


def _good():
    B0, A0, X, S = lora_problem(6, 5, 2, 4, seed=90)
    return [(B0, A0), (S.T, X)], [1.0, -0.1], (B0, A0)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda t, w, i: (t, [1.0], i), ValueError, r"len\(terms\) = 2 but len\(weights\) = 1"),
        (
            lambda t, w, i: ([t[0], (t[1][0], t[1][1][:, :3])], w, i),
            ValueError,
            r"terms\[1\].*\(6, 5\)",
        ),
        (
            lambda t, w, i: ([t[0], torch.zeros(5, 6, dtype=torch.float64)], w, i),
            ValueError,
            r"dense terms\[1\] has shape \(5, 6\)",
        ),
        (
            lambda t, w, i: ([t[0], (t[1][0], t[1][1][:3])], w, i),
            ValueError,
            r"P must be \(6, k\) and Q \(k, 5\)",
        ),
        (lambda t, w, i: ([t[0], "G"], w, i), TypeError, r"terms\[1\] must be a \(P, Q\) pair"),
        (
            lambda t, w, i: ([t[0], (t[1][0], t[1][1].long())], w, i),
            TypeError,
            r"real floating dtype",
        ),
        (lambda t, w, i: (t, [1.0, float("nan")], i), ValueError, r"weights\[1\] must be finite"),
        (lambda t, w, i: (t, [1.0, "x"], i), TypeError, r"weights\[1\] must be a real number"),
        (lambda t, w, i: (t, w, (i[0], i[1][:1])), ValueError, r"disagree on the rank"),
        (lambda t, w, i: (t, w, i[0]), TypeError, r"init must be a pair"),
        (lambda t, w, i: (t, w, (i[0][0], i[1])), ValueError, r"init\[0\] \(B0\) must be a matrix"),
        (lambda t, w, i: (t[1][0], w, i), TypeError, r"terms must be a sequence"),
    ],
)
def test_inconsistent_inputs_raise_with_the_offending_values(change, error, match):
    terms, weights, init = change(*_good())
    with pytest.raises(error, match=match):
        lorsum(terms, weights, init)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"damping": -1.0}, ValueError, r"Invalid damping: -1.0 \(must be finite and >= 0\)"),
        ({"damping": float("inf")}, ValueError, r"Invalid damping: inf"),
        ({"num_iters": -2}, ValueError, r"Invalid num_iters: -2 \(must be >= 0\)"),
        ({"num_iters": 1.5}, TypeError, r"num_iters must be an int, got 1.5"),
        ({"tol": -0.1}, ValueError, r"Invalid tol: -0.1"),
        (
            {"metric_out": torch.ones(5, dtype=torch.float64)},
            ValueError,
            r"metric_out has shape \(5,\); expected \(6,\)",
        ),
        (
            {"metric_in": torch.ones(5, 6, dtype=torch.float64)},
            ValueError,
            r"metric_in has shape \(5, 6\); expected \(5,\) .* \(5, 5\)",
        ),
        ({"metric_in": [1.0] * 5}, TypeError, r"metric_in must be a tensor or None"),
        (
            {"compute_dtype": torch.int32},
            TypeError,
            r"compute_dtype must be a floating torch.dtype",
        ),
    ],
)
def test_invalid_options_raise_with_the_offending_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        lorsum(*_good(), **kwargs)
    if "compute_dtype" not in kwargs and "tol" not in kwargs:
        with pytest.raises(error, match=match):
            next(lorsum_iterates(*_good(), **kwargs))


@given(
    stack=st.integers(1, 4),
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    r=st.integers(1, 4),
    k=st.integers(1, 10),
    num_iters=st.integers(0, 3),
    damping=st.sampled_from([0.0, 1e-3, 0.5]),
    metric=st.sampled_from([None, "diagonal", "dense"]),
    seed=st.integers(0, 2**16),
)
def test_a_stack_of_problems_is_solved_as_each_one_alone(
    stack, m, n, r, k, num_iters, damping, metric, seed
):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(stack, *shape, generator=g, dtype=torch.float64)

    B0, A0, S, X, D = draw(m, r), draw(r, n), draw(k, m), draw(k, n), draw(m, n)
    terms, weights = [(B0, A0), (S.mT, X), D], [1.0, -0.3, 0.1]
    metrics = {}
    if metric == "diagonal":
        metrics = {"metric_out": draw(m).abs() + 0.5, "metric_in": draw(n).abs() + 0.5}
    elif metric == "dense":
        L_out, L_in = draw(m, m), draw(n, n)
        eye_m, eye_n = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
        metrics = {"metric_out": L_out @ L_out.mT + eye_m, "metric_in": L_in @ L_in.mT + eye_n}
    options = {"num_iters": num_iters, "damping": damping}
    B, A = lorsum(terms, weights, (B0, A0), **options, **metrics)
    assert B.shape == (stack, m, r)
    assert A.shape == (stack, r, n)
    for i in range(stack):
        one = [(B0[i], A0[i]), (S[i].mT, X[i]), D[i]]
        B_i, A_i = lorsum(
            one, weights, (B0[i], A0[i]), **options, **{k: v[i] for k, v in metrics.items()}
        )
        # Batched and unbatched kernels round differently, and without damping an r = n
        # problem's r×r systems can amplify that a thousandfold (seen: 5e-9 relative); a
        # member mixed up with another would be off by O(1).
        torch.testing.assert_close(B[i] @ A[i], B_i @ A_i, rtol=1e-7, atol=1e-7)


def test_a_stack_must_carry_the_same_leading_dims_everywhere():
    B0, A0 = torch.zeros(3, 5, 2), torch.zeros(3, 2, 4)
    with pytest.raises(
        ValueError, match=r"init\[1\] \(A0\) must be a stack of matrices of shape \(3,\)"
    ):
        lorsum([(B0, A0)], [1.0], (B0, A0[:2]))
    with pytest.raises(ValueError, match=r"terms\[1\]\[1\] \(right factor\) must be a stack"):
        lorsum([(B0, A0), (torch.zeros(3, 5, 7), torch.zeros(7, 4))], [1.0, 1.0], (B0, A0))
    with pytest.raises(ValueError, match=r"metric_in has shape \(4,\); expected \(3, 4\)"):
        lorsum([(B0, A0)], [1.0], (B0, A0), metric_in=torch.ones(4))


class _ThreadMean:
    """A ``reduce`` for ``K`` threads standing in for ranks: each call returns their mean."""

    def __init__(self, world: int) -> None:
        import threading

        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[list[torch.Tensor] | None] = [None] * world

    def for_rank(self, rank: int):
        def reduce(tensors):
            self.slots[rank] = list(tensors)
            self.barrier.wait()
            mean = [sum(s[i] for s in self.slots) / self.world for i in range(len(tensors))]
            self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
            return mean

        return reduce


@pytest.mark.parametrize("num_iters", [0, 1, 3])
@pytest.mark.parametrize("world", [2, 3])
def test_reduced_local_terms_fit_the_global_target(num_iters, world):
    import threading

    m, n, r, rows = 9, 7, 2, 4
    B0, A0 = randn(m, r, seed=1), randn(r, n, seed=2)
    S = [randn(rows, m, seed=10 + k) for k in range(world)]
    X = [randn(rows, n, seed=20 + k) for k in range(world)]
    metric_out, metric_in = randn(m, seed=3).abs() + 0.5, randn(n, seed=4).abs() + 0.5
    options = {"num_iters": num_iters, "damping": 1e-2, "metric_out": metric_out}
    options["metric_in"] = metric_in
    # The global target averages the ranks' gradients (DDP's mean): rows S_k / K.
    expected = lorsum(
        [(B0, A0), (torch.cat(S).T / world, torch.cat(X))], [1.0, -0.3], (B0, A0), **options
    )
    reducer, results = _ThreadMean(world), [None] * world

    def run(rank):
        results[rank] = lorsum(
            [(B0, A0), (S[rank].T, X[rank])],
            [1.0, -0.3],
            (B0, A0),
            reduce=reducer.for_rank(rank),
            local_terms=[1],
            **options,
        )

    threads = [threading.Thread(target=run, args=(k,)) for k in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for B, A in results:
        err = ref.rel_err(B @ A, expected[0] @ expected[1])
        assert err <= 1e-10, f"world {world}, num_iters {num_iters}: rel_err {err:.3e} > 1e-10"


def test_local_terms_need_a_reduce():
    B0, A0, X, S = lora_problem(5, 4, 2, 3, seed=0)
    with pytest.raises(ValueError, match=r"local_terms=\[1\] needs reduce"):
        lorsum([(B0, A0), (S.T, X)], [1.0, -0.1], (B0, A0), local_terms=[1])
    with pytest.raises(ValueError, match=r"Invalid local_terms index 2 \(there are 2 terms\)"):
        lorsum([(B0, A0), (S.T, X)], [1.0, -0.1], (B0, A0), local_terms=[2], reduce=list)
    with pytest.raises(ValueError, match=r"an index is repeated"):
        lorsum([(B0, A0), (S.T, X)], [1.0, -0.1], (B0, A0), local_terms=[1, 1], reduce=list)
    with pytest.raises(TypeError, match=r"reduce must be callable or None, got int"):
        lorsum([(B0, A0), (S.T, X)], [1.0, -0.1], (B0, A0), local_terms=[1], reduce=3)
