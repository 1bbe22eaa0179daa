"""LoRA-Pro's functional core against dense float64 oracles (spec related-methods §1.7).

Covers: the equivalent gradient is the tangent-space projection of G for the Sylvester X and for
any X (invariant 1, also as a property test); it is the least-squares optimum, checked with lstsq
on the vectorised system, and its residual is orthogonal to the tangent space (2); the Sylvester
solver against a Kronecker-vectorised solve and scipy, and the chosen X is stationary for its
objective (3); reparameterisation invariance (4); G in the tangent space is returned (5); B = 0
gives X = 0, g_A = 0 and the LoRA-FA update of B (6); rank-deficient factors stay finite and the
Cholesky fallback (8); the first full-Adam step is the projected sign step (7); a hand-computed
2×2 case; dtype and shape contracts; and the ValueErrors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorsum.functional import (
    equivalent_gradient,
    lora_pro_adam,
    lora_pro_gradients,
    lora_pro_x,
    solve_symmetric_sylvester,
)
from lorsum.functional.linalg import symmetric_eigh
from lorsum.functional.lora_pro import _damped_cholesky
from tests import reference as ref
from tests.utils import randn, well_conditioned

F64 = torch.float64


def _problem(m=7, n=6, r=3, *, seed=0, scaling=2.0):
    """Well-conditioned full-rank factors, a dense G and the LoRA gradients of G."""
    B, A = well_conditioned(m, r, seed=seed), well_conditioned(r, n, seed=seed + 10)
    G = randn(m, n, seed=seed + 20)
    return A, B, G, scaling * B.T @ G, scaling * G @ A.T


def _projectors(A, B, damping=0.0):
    r = A.shape[0]
    eye = torch.eye(r, dtype=F64)
    P_B = B @ torch.linalg.solve(B.T @ B + damping * eye, B.T)
    P_A = A.T @ torch.linalg.solve(A @ A.T + damping * eye, A)
    return P_B, P_A


def _tangent_projection(A, B, G, damping=0.0):
    """The oracle ``P_B G + G P_A − P_B G P_A`` with explicit dense projectors."""
    P_B, P_A = _projectors(A, B, damping)
    return P_B @ G + G @ P_A - P_B @ G @ P_A


def _message(err, bound, *tensors):
    shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
    return f"rel_err {err:.3e} > {bound:.0e} for shapes {shapes}, dtype {tensors[0].dtype}"


# --- invariant 1: the equivalent gradient ------------------------------------------------------


@pytest.mark.parametrize("choice", ["sylvester", "random", "zero"])
@pytest.mark.parametrize("scaling", [0.5, 2.0])
def test_equivalent_gradient_is_the_tangent_projection_for_any_x(choice, scaling):
    A, B, G, grad_A, grad_B = _problem(scaling=scaling)
    X = {"sylvester": "sylvester", "random": randn(3, 3, seed=5), "zero": torch.zeros(3, 3)}
    g_A, g_B = lora_pro_gradients(A, B, grad_A, grad_B, scaling=scaling, damping=0.0, X=X[choice])
    g_eq = equivalent_gradient(A, B, g_A, g_B, scaling=scaling)
    expected = _tangent_projection(A, B, G)
    err = ref.rel_err(g_eq, expected)
    assert err <= 1e-10, _message(err, 1e-10, A, B, G)


@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    r_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    scaling=st.sampled_from([0.25, 1.0, 2.0, 4.0]),
)
def test_property_equivalent_gradient_is_x_independent_and_projects(m, n, r_frac, seed, scaling):
    r = 1 + int(r_frac * (min(m, n) - 1))
    B, A = well_conditioned(m, r, seed=seed), well_conditioned(r, n, seed=seed + 1)
    G = randn(m, n, seed=seed + 2)
    grad_A, grad_B = scaling * B.T @ G, scaling * G @ A.T
    expected = _tangent_projection(A, B, G)
    for X in ("sylvester", randn(r, r, seed=seed + 3)):
        g_A, g_B = lora_pro_gradients(A, B, grad_A, grad_B, scaling=scaling, damping=0.0, X=X)
        assert g_A.shape == A.shape
        assert g_B.shape == B.shape
        err = ref.rel_err(equivalent_gradient(A, B, g_A, g_B, scaling=scaling), expected)
        assert err <= 1e-10, _message(err, 1e-10, A, B, G)


# --- invariant 2: optimality --------------------------------------------------------------------


def test_equivalent_gradient_is_the_least_squares_optimum_over_all_directions():
    m, n, r, s = 7, 6, 2, 2.0
    A, B, G, grad_A, grad_B = _problem(m, n, r, seed=3, scaling=s)
    # Row-major vectorisation: vec(B g_A) = (B ⊗ I_n) vec(g_A), vec(g_B A) = (I_m ⊗ Aᵀ) vec(g_B).
    J = s * torch.cat(
        [
            torch.kron(B, torch.eye(n, dtype=F64)),
            torch.kron(torch.eye(m, dtype=F64), A.T.contiguous()),
        ],
        1,
    )
    solution = torch.linalg.lstsq(J, G.reshape(-1, 1), driver="gelsd").solution
    best = (J @ solution).reshape(m, n)
    g_A, g_B = lora_pro_gradients(A, B, grad_A, grad_B, scaling=s, damping=0.0)
    err = ref.rel_err(equivalent_gradient(A, B, g_A, g_B, scaling=s), best)
    assert err <= 1e-10, _message(err, 1e-10, A, B, G)


def test_residual_is_orthogonal_to_the_tangent_space_and_no_perturbation_helps():
    A, B, G, grad_A, grad_B = _problem(seed=4)
    s = 2.0
    g_A, g_B = lora_pro_gradients(A, B, grad_A, grad_B, scaling=s, damping=0.0)
    residual = equivalent_gradient(A, B, g_A, g_B, scaling=s) - G
    P_B, P_A = _projectors(A, B)
    I_m, I_n = torch.eye(7, dtype=F64), torch.eye(6, dtype=F64)
    assert ref.rel_err(residual, -(I_m - P_B) @ G @ (I_n - P_A)) <= 1e-10
    # ⟨R, B M + N A⟩ = 0 for all M, N  ⟺  BᵀR = 0 and R Aᵀ = 0.
    scale = residual.norm() * B.norm()
    assert (B.T @ residual).norm() <= 1e-12 * scale
    assert (residual @ A.T).norm() <= 1e-12 * scale
    best = residual.norm()
    for seed in range(20):
        d_A, d_B = 1e-3 * randn(*A.shape, seed=100 + seed), 1e-3 * randn(*B.shape, seed=200 + seed)
        perturbed = equivalent_gradient(A, B, g_A + d_A, g_B + d_B, scaling=s) - G
        assert perturbed.norm() >= best * (1 - 1e-14)


# --- invariant 3: the Sylvester solve and the choice of X -----------------------------------------


def _spd(k, *, seed):
    M = randn(k, k, seed=seed)
    return M @ M.T + 0.1 * torch.eye(k, dtype=F64)


@pytest.mark.parametrize(("p", "q"), [(1, 1), (3, 3), (4, 2)])
def test_sylvester_solver_matches_a_kronecker_vectorised_solve(p, q):
    P, Q, C = _spd(p, seed=1), _spd(q, seed=2), randn(p, q, seed=3)
    X = solve_symmetric_sylvester(P, Q, C)
    # Row-major: vec(P X) = (P ⊗ I_q) vec(X), vec(X Q) = (I_p ⊗ Qᵀ) vec(X).
    K = torch.kron(P, torch.eye(q, dtype=F64)) + torch.kron(
        torch.eye(p, dtype=F64), Q.T.contiguous()
    )
    expected = torch.linalg.solve(K, C.reshape(-1)).reshape(p, q)
    assert ref.rel_err(X, expected) <= 1e-12
    assert ref.rel_err(P @ X + X @ Q, C) <= 1e-12


def test_sylvester_solver_matches_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    P, Q, C = _spd(4, seed=4), _spd(3, seed=5), randn(4, 3, seed=6)
    expected = torch.from_numpy(linalg.solve_sylvester(P.numpy(), Q.numpy(), C.numpy()))
    assert ref.rel_err(solve_symmetric_sylvester(P, Q, C), expected) <= 1e-12


def test_sylvester_solver_accepts_indefinite_matrices_with_nonzero_sums():
    # The solver is exact for any symmetric P, Q whose eigenvalue sums avoid zero.
    P = torch.diag(torch.tensor([3.0, -1.0], dtype=F64))
    Q = torch.tensor([[2.0]], dtype=F64)
    C = torch.tensor([[5.0], [7.0]], dtype=F64)
    torch.testing.assert_close(
        solve_symmetric_sylvester(P, Q, C), torch.tensor([[1.0], [7.0]]).to(F64)
    )


def test_sylvester_x_solves_the_papers_equation():
    s = 2.0
    A, B, _, grad_A, grad_B = _problem(seed=6, scaling=s)
    X = lora_pro_x(A, B, grad_A, grad_B, scaling=s, damping=0.0)
    BtB, AAt = B.T @ B, A @ A.T
    rhs = -torch.linalg.solve(BtB, grad_A) @ A.T / s**2
    assert ref.rel_err(BtB @ X + X @ AAt, rhs) <= 1e-12


@pytest.mark.parametrize("damping", [0.0, 0.3])
@pytest.mark.parametrize("consistent", [True, False])
def test_sylvester_x_is_stationary_for_its_objective(damping, consistent):
    s = 1.5
    A, B, _, grad_A, grad_B = _problem(seed=7, scaling=s)
    if not consistent:  # arbitrary gradients: X is still the exact minimiser of its objective
        grad_A, grad_B = randn(*A.shape, seed=70), randn(*B.shape, seed=71)
    X = lora_pro_x(A, B, grad_A, grad_B, scaling=s, damping=damping).requires_grad_(True)
    g_A, g_B = lora_pro_gradients(A, B, grad_A, grad_B, scaling=s, damping=damping, X=X)
    objective = 0.5 * (g_A - grad_A).square().sum() + 0.5 * (g_B - grad_B).square().sum()
    objective = objective + damping * X.square().sum()
    (derivative,) = torch.autograd.grad(objective, X)
    assert derivative.norm() <= 1e-12 * (grad_A.norm() + grad_B.norm())
    # ... and a minimum: the objective is convex in X.
    with torch.no_grad():
        for seed in range(5):
            other = X + 1e-2 * randn(3, 3, seed=seed)
            o_A, o_B = lora_pro_gradients(A, B, grad_A, grad_B, scaling=s, damping=damping, X=other)
            value = 0.5 * (o_A - grad_A).square().sum() + 0.5 * (o_B - grad_B).square().sum()
            assert value + damping * other.square().sum() >= objective


# --- invariants 4 and 5 ------------------------------------------------------------------------


def test_reparameterisation_leaves_the_equivalent_gradient_unchanged():
    s = 2.0
    A, B, G, grad_A, grad_B = _problem(seed=8, scaling=s)
    R = well_conditioned(3, 3, seed=80)
    B2, A2 = B @ R, torch.linalg.solve(R, A)
    g_A, g_B = lora_pro_gradients(A, B, grad_A, grad_B, scaling=s, damping=0.0)
    g_A2, g_B2 = lora_pro_gradients(A2, B2, s * B2.T @ G, s * G @ A2.T, scaling=s, damping=0.0)
    err = ref.rel_err(
        equivalent_gradient(A2, B2, g_A2, g_B2, scaling=s),
        equivalent_gradient(A, B, g_A, g_B, scaling=s),
    )
    assert err <= 1e-10, _message(err, 1e-10, A, B, G)


def test_gradient_in_the_tangent_space_is_returned_unchanged():
    s = 3.0
    A, B, _, _, _ = _problem(seed=9, scaling=s)
    G = B @ randn(3, 6, seed=90) + randn(7, 3, seed=91) @ A  # G = B M + N A
    g_A, g_B = lora_pro_gradients(A, B, s * B.T @ G, s * G @ A.T, scaling=s, damping=0.0)
    assert ref.rel_err(equivalent_gradient(A, B, g_A, g_B, scaling=s), G) <= 1e-12


# --- invariants 6 and 8: B = 0 and rank deficiency ------------------------------------------------


def test_zero_b_gives_zero_x_zero_g_a_and_the_lorafa_update_of_b():
    s, damping = 2.0, 1e-8
    A, G = well_conditioned(3, 6, seed=10), randn(7, 6, seed=11)
    B = torch.zeros(7, 3, dtype=F64)
    grad_A, grad_B = s * B.T @ G, s * G @ A.T  # grad_A = 0, as autograd gives it
    X = lora_pro_x(A, B, grad_A, grad_B, scaling=s, damping=damping)
    g_A, g_B = lora_pro_gradients(A, B, grad_A, grad_B, scaling=s, damping=damping)
    assert torch.equal(X, torch.zeros_like(X))
    assert torch.equal(g_A, torch.zeros_like(g_A))
    # LoRA-FA (PEFT's create_lorafa_optimizer): g_B = (1/s²) ∇_B (AAᵀ + δI)⁻¹.
    lora_fa = torch.linalg.solve(A @ A.T + damping * torch.eye(3, dtype=F64), grad_B.T).T / s**2
    assert ref.rel_err(g_B, lora_fa) <= 1e-12
    # ... whose equivalent gradient is G P_A.
    _, P_A = _projectors(A, B, damping)
    assert ref.rel_err(equivalent_gradient(A, B, g_A, g_B, scaling=s), G @ P_A) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["zero_B", "zero_A_and_B", "rank_one_B", "rank_one_both"])
def test_rank_deficient_factors_give_finite_gradients(case, dtype):
    A, B, G, _, _ = _problem(seed=12)
    rank_one_B = randn(7, 1, seed=120) @ randn(1, 3, seed=121)
    rank_one_A = randn(3, 1, seed=122) @ randn(1, 6, seed=123)
    A, B = {
        "zero_B": (A, torch.zeros_like(B)),
        "zero_A_and_B": (torch.zeros_like(A), torch.zeros_like(B)),
        "rank_one_B": (A, rank_one_B),
        "rank_one_both": (rank_one_A, rank_one_B),
    }[case]
    A, B, G = A.to(dtype), B.to(dtype), G.to(dtype)
    g_A, g_B = lora_pro_gradients(A, B, 2 * B.T @ G, 2 * G @ A.T, scaling=2.0, damping=1e-8)
    assert torch.isfinite(g_A).all()
    assert torch.isfinite(g_B).all()
    d_A, d_B, M, V = lora_pro_adam(
        A, B, 2 * B.T @ G, 2 * G @ A.T, torch.zeros_like(G), torch.zeros_like(G),
        step=1, scaling=2.0, betas=(0.9, 0.999), eps=1e-8, damping=1e-8,
    )  # fmt: skip
    for t in (d_A, d_B, M, V):
        assert torch.isfinite(t).all()


def test_failed_cholesky_falls_back_to_the_clamped_eigh_factor():
    # An indefinite "Gram" (rounding gone wrong): Cholesky of K + δI fails, the factor is rebuilt
    # from the eigenvalues clamped at 0, i.e. L Lᵀ = diag(4, 0) + δI.
    K, damping = torch.diag(torch.tensor([4.0, -1.0], dtype=F64)), 0.5
    lam, U = symmetric_eigh(K)
    L = _damped_cholesky(K, damping, lam.clamp_min(0) + damping, U)
    torch.testing.assert_close(L @ L.T, torch.diag(torch.tensor([4.5, 0.5], dtype=F64)))
    assert torch.equal(L, L.tril())


# --- invariant 7: the first full-Adam step --------------------------------------------------------


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.5)])
def test_first_adam_step_is_the_projected_sign_of_the_equivalent_gradient(betas):
    s, eps = 2.0, 1e-8
    A, B, G, grad_A, grad_B = _problem(seed=13, scaling=s)
    zeros = torch.zeros_like(G)
    d_A, d_B, M, V = lora_pro_adam(
        A, B, grad_A, grad_B, zeros, zeros,
        step=1, scaling=s, betas=betas, eps=eps, damping=0.0,
    )  # fmt: skip
    g_eq = _tangent_projection(A, B, G)
    assert ref.rel_err(M, (1 - betas[0]) * g_eq) <= 1e-12
    assert ref.rel_err(V, (1 - betas[1]) * g_eq.square()) <= 1e-12
    delta = g_eq / (g_eq.abs() + eps)  # ≈ sign(g̃) with the standard t = 1
    assert ref.rel_err(delta, g_eq.sign()) <= 1e-6
    step = equivalent_gradient(A, B, d_A, d_B, scaling=s)
    assert ref.rel_err(step, _tangent_projection(A, B, delta)) <= 1e-10


def test_later_adam_steps_use_the_bias_corrected_moments():
    s, betas, eps, t = 1.0, (0.8, 0.9), 1e-8, 3
    A, B, G, grad_A, grad_B = _problem(seed=14, scaling=s)
    M0, V0 = randn(7, 6, seed=140), randn(7, 6, seed=141).square()
    d_A, d_B, M, V = lora_pro_adam(
        A, B, grad_A, grad_B, M0, V0, step=t, scaling=s, betas=betas, eps=eps, damping=0.0
    )
    g_eq = _tangent_projection(A, B, G)
    M_ref = betas[0] * M0 + (1 - betas[0]) * g_eq
    V_ref = betas[1] * V0 + (1 - betas[1]) * g_eq.square()
    delta = (M_ref / (1 - betas[0] ** t)) / (V_ref.sqrt() / (1 - betas[1] ** t) ** 0.5 + eps)
    assert ref.rel_err(M, M_ref) <= 1e-12
    assert ref.rel_err(V, V_ref) <= 1e-12
    step = equivalent_gradient(A, B, d_A, d_B, scaling=s)
    assert ref.rel_err(step, _tangent_projection(A, B, delta)) <= 1e-10
    # The inputs are not modified.
    assert torch.equal(M0, randn(7, 6, seed=140))


# --- a hand-computed case ------------------------------------------------------------------------


def test_hand_computed_two_by_two_rank_one_case():
    # B = e₁, A = e₁ᵀ, s = 1, G = [[2, 3], [5, 7]]: P_B = P_A = diag(1, 0), so g̃ = [[2, 3], [5, 0]].
    # X solves 1·X + X·1 = −N/s² with N = ∇_A Aᵀ = 2, so X = −1 and the "2" splits evenly:
    # g_A = [[2, 3]] + X A = [[1, 3]], g_B = [[0], [5]] − B X = [[1], [5]].
    B = torch.tensor([[1.0], [0.0]], dtype=F64)
    A = torch.tensor([[1.0, 0.0]], dtype=F64)
    G = torch.tensor([[2.0, 3.0], [5.0, 7.0]], dtype=F64)
    g_A, g_B = lora_pro_gradients(A, B, B.T @ G, G @ A.T, scaling=1.0, damping=0.0)
    assert torch.equal(g_A, torch.tensor([[1.0, 3.0]], dtype=F64))
    assert torch.equal(g_B, torch.tensor([[1.0], [5.0]], dtype=F64))
    g_eq = equivalent_gradient(A, B, g_A, g_B, scaling=1.0)
    assert torch.equal(g_eq, torch.tensor([[2.0, 3.0], [5.0, 0.0]], dtype=F64))


# --- dtypes and errors ---------------------------------------------------------------------------


def test_outputs_keep_the_input_dtype_and_compute_in_at_least_float32():
    A, B, _, grad_A, grad_B = _problem(seed=15)
    bf16 = [t.to(torch.bfloat16) for t in (A, B, grad_A, grad_B)]
    g_A, g_B = lora_pro_gradients(*bf16, scaling=2.0, damping=1e-8)
    assert g_A.dtype == g_B.dtype == torch.bfloat16
    # The bf16 result is the float32 result rounded once (to bf16), not a bf16 computation.
    f32 = [t.float() for t in bf16]
    e_A, e_B = lora_pro_gradients(*f32, scaling=2.0, damping=1e-8)
    assert torch.equal(g_A, e_A.to(torch.bfloat16))
    assert torch.equal(g_B, e_B.to(torch.bfloat16))
    X = lora_pro_x(*bf16, scaling=2.0, damping=1e-8)
    assert X.dtype == torch.float32
    P = _spd(3, seed=16).to(torch.bfloat16)
    assert solve_symmetric_sylvester(P, P, P).dtype == torch.bfloat16


def test_errors_name_the_bad_value():
    A, B, _, grad_A, grad_B = _problem(seed=17)
    with pytest.raises(ValueError, match=r"Invalid damping: -1"):
        lora_pro_gradients(A, B, grad_A, grad_B, scaling=1.0, damping=-1.0)
    with pytest.raises(ValueError, match=r"Invalid scaling: 0"):
        lora_pro_gradients(A, B, grad_A, grad_B, scaling=0.0, damping=0.0)
    with pytest.raises(ValueError, match=r"Invalid X: 'zero'"):
        lora_pro_gradients(A, B, grad_A, grad_B, scaling=1.0, damping=0.0, X="zero")
    with pytest.raises(ValueError, match=r"X must be \(3, 3\), got \(2, 2\)"):
        lora_pro_gradients(A, B, grad_A, grad_B, scaling=1.0, damping=0.0, X=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"do not match the factors"):
        lora_pro_gradients(A, B, grad_A.T, grad_B, scaling=1.0, damping=0.0)
    with pytest.raises(ValueError, match=r"expected A \(r, n\) and B \(m, r\)"):
        equivalent_gradient(A, B.T, grad_A, grad_B.T, scaling=1.0)
    with pytest.raises(ValueError, match=r"Sylvester shapes do not fit"):
        solve_symmetric_sylvester(torch.eye(2), torch.eye(3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"must be 2-d"):
        solve_symmetric_sylvester(torch.eye(2), torch.eye(2), torch.zeros(2))


def test_adam_errors_name_the_bad_value():
    A, B, G, grad_A, grad_B = _problem(seed=18)
    zeros = torch.zeros_like(G)
    kwargs = {"step": 1, "scaling": 1.0, "betas": (0.9, 0.999), "eps": 1e-8, "damping": 0.0}
    bad = [
        ({"step": 0}, r"Invalid step: 0"),
        ({"betas": (1.0, 0.999)}, r"Invalid betas: \(1.0, 0.999\)"),
        ({"eps": 0.0}, r"Invalid eps: 0.0"),
    ]
    for change, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            lora_pro_adam(A, B, grad_A, grad_B, zeros, zeros, **{**kwargs, **change})
    with pytest.raises(ValueError, match=r"moments must be \(7, 6\)"):
        lora_pro_adam(A, B, grad_A, grad_B, zeros.T, zeros.T, **kwargs)
