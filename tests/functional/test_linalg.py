"""prox_solve: the damped Cholesky solve, its rounding-shift retry and the λ → 0⁺ limit."""

from __future__ import annotations

import pytest
import torch

from lorsum.functional import default_compute_dtype, prox_solve
from tests import reference as ref
from tests.utils import randn


@pytest.mark.parametrize("damping", [1e-6, 0.1, 10.0])
def test_damped_solve_matches_a_literal_dense_solve(damping):
    L = randn(5, 5, seed=1)
    K, R, Z0 = L @ L.T, randn(5, 3, seed=2), randn(5, 3, seed=3)
    expected = torch.linalg.solve(K + damping * torch.eye(5, dtype=torch.float64), R + damping * Z0)
    assert ref.rel_err(prox_solve(K, R, Z0, damping), expected) <= 1e-10


def test_undamped_singular_solve_keeps_the_anchor_on_the_null_space():
    U = torch.linalg.qr(randn(4, 4, seed=4)).Q
    K = (U[:, :2] * torch.tensor([3.0, 0.5], dtype=torch.float64)) @ U[:, :2].T  # rank 2
    R, Z0 = K @ randn(4, 2, seed=5), randn(4, 2, seed=6)
    Z = prox_solve(K, R, Z0, 0.0)
    # The damped solution differs from the limit by about λ/0.5 on the range of K and by
    # ε‖K‖/λ on its (numerically not exactly) null space: both near 1e-8 at λ = 1e-8.
    limit = prox_solve(K, R, Z0, 1e-8)
    assert ref.rel_err(Z, limit) <= 1e-6
    null = U[:, 2:]
    assert ref.rel_err(null.T @ Z, null.T @ Z0) <= 1e-12  # untouched where K sees nothing
    assert ref.rel_err(K @ Z, R) <= 1e-12  # least squares where it does


def test_zero_gram_returns_the_anchor():
    Z0 = randn(3, 2, seed=7)
    torch.testing.assert_close(
        prox_solve(
            torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64), Z0, 0.0
        ),
        Z0,
    )


def test_a_gram_indefinite_by_rounding_is_solved_with_the_rounding_shift():
    # float32 Gram of a rank-1 factor with a huge norm: K + λI with λ far below ε‖K‖ is not
    # numerically positive definite, so the first factorisation fails and the shifted one runs.
    b = torch.tensor([[1e4], [1e4 * (1 + 2**-20)], [-1e4]], dtype=torch.float32)
    K = b @ b.T
    K[2, 2] -= 1.0  # rounding-sized indefiniteness (|δ| ≪ ε‖K‖ ≈ 36)
    assert torch.linalg.cholesky_ex(K + 1e-6 * torch.eye(3))[1] != 0
    R, Z0 = K @ torch.ones(3, 1), torch.zeros(3, 1)
    Z = prox_solve(K, R, Z0, 1e-6)
    assert torch.isfinite(Z).all()
    # The solution fits K Z = R to the accuracy the float32 Gram carries.
    assert torch.linalg.norm(K @ Z - R) <= 1e-4 * torch.linalg.norm(R)


def test_a_truly_indefinite_gram_gives_nan_not_the_identity():
    # An indefinite "Gram" far beyond rounding: no shift the precision justifies makes it
    # definite, so the solve says so with NaN (the optimizers then skip and count the step).
    K = torch.diag(torch.tensor([4.0, -3.0], dtype=torch.float64))  # K + λI = diag(5, -2)
    R = torch.tensor([[8.0], [1.0]], dtype=torch.float64)
    Z = prox_solve(K, R, torch.zeros(2, 1, dtype=torch.float64), 1.0)
    assert torch.isnan(Z).all()


def test_solves_are_batched_over_leading_dimensions():
    L = randn(3, 4, 4, seed=8)
    K, R, Z0 = L @ L.mT, randn(3, 4, 2, seed=9), randn(3, 4, 2, seed=10)
    batched = prox_solve(K, R, Z0, 0.5)
    for i in range(3):
        assert ref.rel_err(batched[i], prox_solve(K[i], R[i], Z0[i], 0.5)) <= 1e-12
    assert ref.rel_err(prox_solve(K, R, Z0, 0.0)[1], prox_solve(K[1], R[1], Z0[1], 0.0)) <= 1e-10


def test_compute_dtype_is_at_least_float32():
    assert default_compute_dtype(torch.ones(1, dtype=torch.bfloat16)) == torch.float32
    assert default_compute_dtype(torch.ones(1, dtype=torch.float16)) == torch.float32
    assert default_compute_dtype(torch.ones(1), torch.ones(1, dtype=torch.float64)) == torch.float64


def test_an_eigh_that_fails_to_converge_gives_nan_not_an_exception(monkeypatch):
    def refuse(_):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    Z = prox_solve(torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64),
                   torch.zeros(2, 1, dtype=torch.float64), 0.0)  # fmt: skip
    assert torch.isnan(Z).all()


def test_a_non_finite_matrix_in_a_stack_blanks_only_its_own_eigenpairs():
    from lorsum.functional.linalg import symmetric_eigh

    M = randn(3, 4, 4, seed=0, dtype=torch.float64)
    M = M @ M.mT
    M[1, 0, 0] = float("nan")
    values, vectors = symmetric_eigh(M)
    assert torch.isnan(values[1]).all()
    assert torch.isnan(vectors[1]).all()
    for i in (0, 2):
        alone_values, alone_vectors = symmetric_eigh(M[i])
        torch.testing.assert_close(values[i], alone_values)
        torch.testing.assert_close(vectors[i].abs(), alone_vectors.abs())
