"""Scaled LoRSum's metrics: K-FAC and Shampoo statistics against dense oracles (both diagonal
routes), running averages with bias correction, damped fractional powers, two-sided
preconditioning, the scaled Jacobi closed form, stacks of layers (leading dims) against a loop
over the layers (property tests), and every input error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorsum.functional import (
    bias_corrected,
    kfac_statistics,
    lorsum,
    metric_power,
    precondition_pair,
    running_average_,
    shampoo_statistics,
)
from tests import reference as ref
from tests.utils import lora_problem, randn


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kfac_statistics_match_the_dense_oracle(reduction):
    N, n, m = 40, 7, 5
    X, S = randn(N, n, seed=1), randn(N, m, seed=2)
    a = N if reduction == "mean" else 1 / N
    out, inp = kfac_statistics(X, S, diagonal=False, loss_reduction=reduction)
    assert ref.rel_err(out, a * S.T @ S) <= 1e-13
    assert ref.rel_err(inp, X.T @ X / N) <= 1e-13
    out_d, in_d = kfac_statistics(X, S, loss_reduction=reduction)
    assert ref.rel_err(out_d, torch.diagonal(out)) <= 1e-13
    assert ref.rel_err(in_d, torch.diagonal(inp)) <= 1e-13


@pytest.mark.parametrize(
    ("N", "m", "n"),
    [(4, 30, 20), (64, 12, 9), (1, 1, 1)],  # the N × N Gram route, the blocked-G route, scalars
)
def test_shampoo_statistics_match_the_dense_oracle(N, m, n):
    X, S = randn(N, n, seed=3), randn(N, m, seed=4)
    G = S.T @ X
    out, inp = shampoo_statistics(X, S, diagonal=False)
    assert ref.rel_err(out, N * G @ G.T) <= 1e-13
    assert ref.rel_err(inp, N * G.T @ G) <= 1e-13
    out_d, in_d = shampoo_statistics(X, S)
    assert ref.rel_err(out_d, N * (G * G).sum(1)) <= 1e-13
    assert ref.rel_err(in_d, N * (G * G).sum(0)) <= 1e-13


def test_bias_corrected_running_average_of_a_constant_is_that_constant():
    stat = randn(6, seed=5).abs()
    avg = torch.zeros(6, dtype=torch.float64)
    for step in range(1, 6):
        returned = running_average_(avg, stat, 0.9)
        assert returned is avg  # in place
        assert ref.rel_err(bias_corrected(avg, 0.9, step), stat) <= 1e-14
    torch.testing.assert_close(avg, (1 - 0.9**5) * stat)


def test_diagonal_metric_power_is_elementwise():
    v = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(metric_power(v, damping=1.0, power=0.5), (v + 1.0).sqrt())
    torch.testing.assert_close(metric_power(v, damping=1.0, power=-1.0), 1.0 / (v + 1.0))


def test_dense_metric_power_composes_like_a_matrix_function():
    L = randn(6, 6, seed=6)
    C = L @ L.T
    half = metric_power(C, damping=0.1, power=0.5)
    damped = C + 0.1 * torch.eye(6, dtype=torch.float64)
    assert ref.rel_err(half @ half, damped) <= 1e-12
    assert (
        ref.rel_err(
            metric_power(C, damping=0.1, power=-0.5) @ half, torch.eye(6, dtype=torch.float64)
        )
        <= 1e-12
    )
    torch.testing.assert_close(half, half.T)


def test_metric_power_clamps_rounding_negatives_of_a_psd_statistic():
    C = torch.tensor([[1.0, 0.0], [0.0, -1e-18]], dtype=torch.float64)
    torch.testing.assert_close(
        metric_power(C, damping=0.0, power=0.5),
        torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)),
    )


@pytest.mark.parametrize("dense", [False, True])
def test_preconditioned_pair_is_the_two_sided_solve(dense):
    X, S = randn(10, 7, seed=7), randn(10, 5, seed=8)
    d_out, d_in = randn(5, seed=9).abs() + 0.5, randn(7, seed=10).abs() + 0.5
    Mo, Mi = (torch.diag(d_out), torch.diag(d_in)) if dense else (d_out, d_in)
    P, Q = precondition_pair(S.T, X, Mo, Mi)
    expected = torch.diag(1 / d_out) @ S.T @ X @ torch.diag(1 / d_in)
    assert ref.rel_err(P @ Q, expected) <= 1e-13
    assert P.shape == (5, 10)
    assert Q.shape == (10, 7)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_scaled_jacobi_pass_is_the_metric_preconditioned_riemannian_step(dense, damping):
    # spec §8 B.16: A⁺ = A − η(BᵀP_out B + λI)⁻¹ BᵀG P_in⁻¹,
    #               B⁺ = B − η P_out⁻¹ G Aᵀ(A P_in Aᵀ + λI)⁻¹
    B0, A0, X, S = lora_problem(12, 9, 3, 20, seed=11)
    lr, r = 0.1, 3
    G = S.T @ X
    if dense:
        Lo, Li = randn(12, 12, seed=12), randn(9, 9, seed=13)
        Mo, Mi = (
            Lo @ Lo.T / 12 + 0.5 * torch.eye(12, dtype=torch.float64),
            Li @ Li.T / 9 + 0.5 * torch.eye(9, dtype=torch.float64),
        )
    else:
        Mo, Mi = randn(12, seed=12).abs() + 0.5, randn(9, seed=13).abs() + 0.5
    Mo_d, Mi_d = ref.as_matrix(Mo, 12), ref.as_matrix(Mi, 9)
    terms = [(B0, A0), precondition_pair(S.T, X, Mo, Mi)]
    B, A = lorsum(
        terms, [1.0, -lr], (B0, A0), num_iters=0, damping=damping, metric_out=Mo, metric_in=Mi
    )
    eye = torch.eye(r, dtype=torch.float64)
    A1 = A0 - lr * torch.linalg.solve(
        B0.T @ Mo_d @ B0 + damping * eye, B0.T @ G @ torch.linalg.inv(Mi_d)
    )
    B1 = B0 - lr * torch.linalg.solve(Mo_d, G) @ A0.T @ torch.linalg.inv(
        A0 @ Mi_d @ A0.T + damping * eye
    )
    assert ref.rel_err(A, A1) <= 1e-10
    assert ref.rel_err(B, B1) <= 1e-10


def test_low_precision_batches_give_float32_statistics():
    X, S = randn(8, 4, seed=14).bfloat16(), randn(8, 3, seed=15).bfloat16()
    out, inp = kfac_statistics(X, S)
    assert out.dtype == inp.dtype == torch.float32


# --- stacks: leading dims equal a loop over the layers --------------------------------------------

STACK = st.integers(1, 4)
SIZE = st.integers(1, 24)
SEED = st.integers(0, 2**16)


def _spd(G: int, d: int, *, seed: int) -> torch.Tensor:
    """``G`` symmetric positive definite ``d × d`` matrices, eigenvalues in about ``[0.5, 1.5]``."""
    L = randn(G, d, d, seed=seed)
    return L @ L.mT / d + 0.5 * torch.eye(d, dtype=torch.float64)


def _ones(*shape: int) -> torch.Tensor:
    return torch.ones(*shape)


def _assert_each_member(stacked, alone):
    """``stacked[i]`` equals ``alone[i]`` for every member, tuple by tuple."""
    for i, member in enumerate(alone):
        for got, expected in zip(stacked, member, strict=True):
            assert got.shape[1:] == expected.shape, (i, got.shape, expected.shape)
            # Batched and single products may block the sums differently: rounding only.
            torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12)


@given(
    G=STACK, N=st.integers(1, 12), m=SIZE, n=SIZE, seed=SEED,
    diagonal=st.booleans(), reduction=st.sampled_from(["mean", "sum"]),
)  # fmt: skip
def test_stacked_statistics_equal_a_loop_over_the_layers(G, N, m, n, seed, diagonal, reduction):
    # Small N against m, n takes Shampoo's N × N Gram route, large N its blocked-G route.
    X, S = randn(G, N, n, seed=seed), randn(G, N, m, seed=seed + 1)
    options = {"diagonal": diagonal, "loss_reduction": reduction}
    for statistics in (kfac_statistics, shampoo_statistics):
        stacked = statistics(X, S, **options)
        _assert_each_member(stacked, [statistics(X[i], S[i], **options) for i in range(G)])


@given(
    G=STACK, d=SIZE, seed=SEED, diagonal=st.booleans(),
    power=st.sampled_from([0.0, 0.25, 0.5, 1.0, -0.5]), damping=st.sampled_from([1e-3, 1.0]),
)  # fmt: skip
def test_a_stacked_metric_power_equals_a_loop(G, d, seed, diagonal, power, damping):
    C = randn(G, d, seed=seed).abs() if diagonal else _spd(G, d, seed=seed) - 0.4 * torch.eye(d)
    stacked = metric_power(C, damping=damping, power=power, diagonal=diagonal)
    alone = [metric_power(C[i], damping=damping, power=power) for i in range(G)]
    _assert_each_member((stacked,), [(M,) for M in alone])


def test_a_non_finite_member_of_a_dense_stack_gives_nan_for_itself_alone():
    C = _spd(3, 5, seed=20)
    C[1, 2, 2] = float("nan")
    M = metric_power(C, damping=1e-3, power=0.5, diagonal=False)
    assert torch.isnan(M[1]).all()
    for i in (0, 2):
        torch.testing.assert_close(M[i], metric_power(C[i], damping=1e-3, power=0.5))


@given(
    G=STACK, m=SIZE, n=SIZE, k=st.integers(0, 12), seed=SEED,
    out_form=st.sampled_from(["diagonal", "dense"]),
    in_form=st.sampled_from(["diagonal", "dense", "identity"]),
)  # fmt: skip
def test_a_stacked_preconditioned_pair_equals_a_loop(G, m, n, k, seed, out_form, in_form):
    P, Q = randn(G, m, k, seed=seed), randn(G, k, n, seed=seed + 1)
    M_out = _spd(G, m, seed=seed + 2) if out_form == "dense" else randn(G, m, seed=seed).abs() + 0.5
    M_in = _spd(G, n, seed=seed + 3) if in_form == "dense" else randn(G, n, seed=seed).abs() + 0.5
    M_in = None if in_form == "identity" else M_in
    stacked = precondition_pair(P, Q, M_out, M_in)
    alone = [
        precondition_pair(P[i], Q[i], M_out[i], None if M_in is None else M_in[i]) for i in range(G)
    ]
    _assert_each_member(stacked, alone)


@given(G=STACK, d=SIZE, seed=SEED, dense=st.booleans(), step=st.integers(1, 5))
def test_a_stacked_running_average_equals_a_loop(G, d, seed, dense, step):
    shape = (G, d, d) if dense else (G, d)
    average, new = randn(*shape, seed=seed), randn(*shape, seed=seed + 1)
    alone = [
        (bias_corrected(running_average_(average[i].clone(), new[i], 0.9), 0.9, step),)
        for i in range(G)
    ]
    stacked = bias_corrected(running_average_(average.clone(), new, 0.9), 0.9, step)
    _assert_each_member((stacked,), alone)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: kfac_statistics(randn(4, 3, seed=0), randn(5, 2, seed=0)),
            ValueError,
            r"inputs has 4 rows but output_grads has 5",
        ),
        (
            lambda: shampoo_statistics(randn(0, 3, seed=0), randn(0, 2, seed=0)),
            ValueError,
            r"the batch is empty",
        ),
        (
            lambda: kfac_statistics(randn(4, 3, seed=0), randn(4, 2, seed=0), loss_reduction="avg"),
            ValueError,
            r"Invalid loss_reduction: 'avg'",
        ),
        (
            lambda: running_average_(torch.zeros(3), torch.zeros(3), 1.0),
            ValueError,
            r"Invalid beta: 1.0",
        ),
        (
            lambda: running_average_(torch.zeros(3), torch.zeros(4), 0.9),
            ValueError,
            r"running average has shape \(3,\) but the new statistic \(4,\)",
        ),
        (lambda: bias_corrected(torch.zeros(3), 0.9, 0), ValueError, r"Invalid step: 0"),
        (
            lambda: metric_power(torch.ones(3), damping=-1.0, power=0.5),
            ValueError,
            r"Invalid damping: -1.0",
        ),
        (
            lambda: metric_power(torch.ones(3), damping=0.0, power=-0.5),
            ValueError,
            r"power -0.5 < 0 needs damping > 0",
        ),
        (
            lambda: metric_power(torch.ones(3), damping=0.1, power=float("nan")),
            ValueError,
            r"Invalid power: nan",
        ),
        (
            lambda: metric_power(torch.ones(2, 3), damping=0.1, power=0.5),
            ValueError,
            r"must be square, got shape \(2, 3\)",
        ),
        (
            lambda: metric_power(torch.ones(2, 2, 2), damping=0.1, power=0.5),
            ValueError,
            r"vector \(diagonal\) or a square matrix",
        ),
        (
            lambda: precondition_pair(torch.ones(3, 2), torch.ones(3, 4), None, None),
            ValueError,
            r"left \(3, 2\) and right \(3, 4\) do not chain",
        ),
        (
            lambda: precondition_pair(torch.ones(3, 2), torch.ones(2, 4), torch.ones(4), None),
            ValueError,
            r"metric_out has shape \(4,\); expected \(3,\) or \(3, 3\)",
        ),
        (
            lambda: precondition_pair(torch.ones(3, 2), torch.ones(2, 4), -torch.eye(3), None),
            ValueError,
            r"metric_out is not positive definite",
        ),
        (
            lambda: metric_power(torch.ones(3), damping=0.1, power=0.5, diagonal="yes"),
            ValueError,
            r"Invalid diagonal: 'yes'",
        ),
        (
            lambda: metric_power(torch.ones(4, 2, 3), damping=0.1, power=0.5, diagonal=False),
            ValueError,
            r"must be square, got shape \(4, 2, 3\)",
        ),
        (
            lambda: metric_power(torch.ones(()), damping=0.1, power=0.5, diagonal=True),
            ValueError,
            r"a diagonal statistic needs at least 1 dim, got shape \(\)",
        ),
        (
            lambda: metric_power([1.0], damping=0.1, power=0.5),
            ValueError,
            r"statistic must be a tensor, got list",
        ),
        (
            lambda: shampoo_statistics(torch.ones(2, 4, 3), torch.ones(3, 4, 2)),
            ValueError,
            r"output_grads must be a stack of matrices of shape \(2,\) \+ \(·, ·\), got "
            r"shape \(3, 4, 2\)",
        ),
        (
            lambda: kfac_statistics(torch.ones(2, 4, 3), torch.ones(2, 5, 2)),
            ValueError,
            r"inputs has 4 rows but output_grads has 5",
        ),
        (
            lambda: precondition_pair(torch.ones(2, 3, 2), torch.ones(2, 4), None, None),
            ValueError,
            r"right must be a stack of matrices of shape \(2,\)",
        ),
        (
            lambda: precondition_pair(
                torch.ones(2, 3, 2), torch.ones(2, 2, 4), torch.ones(3), None
            ),
            ValueError,
            r"metric_out has shape \(3,\); expected \(2, 3\) or \(2, 3, 3\)",
        ),
        (
            lambda: precondition_pair(
                torch.ones(2, 3, 2),
                torch.ones(2, 2, 4),
                torch.stack([torch.eye(3), -torch.eye(3)]),
                None,
            ),
            ValueError,
            r"metric_out is not positive definite \(member 1 of the stack\) \(Cholesky failed "
            r"at column 1\)",
        ),
        (
            lambda: precondition_pair(
                torch.ones(3, 2), torch.ones(2, 4), None, None, not_positive_definite="ignore"
            ),
            ValueError,
            r"Invalid not_positive_definite: 'ignore' \(must be 'raise' or 'nan'\)",
        ),
    ],
)
def test_invalid_arguments_raise_with_the_offending_values(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_metric_that_is_not_positive_definite_can_give_nan_for_its_member_alone():
    from tests.host_reads import no_host_reads

    P, Q = randn(2, 3, 2, seed=0), randn(2, 2, 4, seed=1)
    metric_out = torch.stack(
        [2.0 * torch.eye(3, dtype=torch.float64), -torch.eye(3, dtype=torch.float64)]
    )
    with no_host_reads():  # the "nan" policy reads no flag back from the device
        P_new, Q_new = precondition_pair(P, Q, metric_out, None, not_positive_definite="nan")
    torch.testing.assert_close(P_new[0], P[0] / 2.0)
    assert torch.isnan(P_new[1]).all()
    torch.testing.assert_close(Q_new, Q)  # no metric_in: untouched
