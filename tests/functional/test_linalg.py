"""prox_solve: the damped Cholesky solve, its eigh fallback and the λ → 0⁺ limit."""

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


def test_failed_cholesky_falls_back_to_eigh_not_to_the_identity():
    # An indefinite "Gram" (rounding gone wrong) makes Cholesky fail; the eigh path clamps the
    # negative eigenvalue at zero and still solves the damped system.
    K = torch.diag(torch.tensor([4.0, -1.0], dtype=torch.float64))
    R, Z0 = (
        torch.tensor([[8.0], [1.0]], dtype=torch.float64),
        torch.zeros(2, 1, dtype=torch.float64),
    )
    Z = prox_solve(K, R, Z0, 1.0)
    torch.testing.assert_close(Z, torch.tensor([[8.0 / 5.0], [1.0]], dtype=torch.float64))


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
