"""LoRA-Pro's math: the equivalent gradient, its closed-form adjustment of the LoRA gradients, the
symmetric Sylvester solve that picks the free ``X``, and the full-space Adam step it projects.

Every function except :func:`solve_symmetric_sylvester` also takes stacks of pairs: the same
leading batch dims ``…`` on every argument (``A (…, r, n)``, ``B (…, m, r)``, moments
``(…, m, n)``), each member computed as if alone, with one batched kernel per operation.

Reference: Wang, Zhang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
arXiv:2407.18242; official code github.com/mrflogs/LoRA-Pro @ fe26027. Spec:
``shared/spec/related-methods.md`` §1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lorsum.functional.linalg import default_compute_dtype, symmetric_eigh

__all__ = [
    "equivalent_gradient",
    "lora_pro_adam",
    "lora_pro_gradients",
    "lora_pro_x",
    "solve_symmetric_sylvester",
]


def solve_symmetric_sylvester(
    P: Tensor,  # (p, p), symmetric
    Q: Tensor,  # (q, q), symmetric
    C: Tensor,  # (p, q)
    *,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Solve ``P X + X Q = C`` for symmetric ``P`` and ``Q`` by diagonalising both.

    .. math::

        P = U \Lambda U^T,\quad Q = V M V^T,\qquad
        X = U \left[ (U^T C V) \oslash (\lambda_i + \mu_j) \right] V^T

    The solution exists and is unique exactly when no sum ``λ_i + μ_j`` of an eigenvalue of ``P``
    and one of ``Q`` is zero; it is the case LoRA-Pro meets (``P = BᵀB``, ``Q = AAᵀ``, positive
    semi-definite, one of them definite). The solver uses only ``eigh`` (real, stable for symmetric
    matrices), never the complex ``eig`` route or an inverse. A zero sum gives ``inf`` or ``nan``
    in the output; nothing is read back from the device to check it. Cost ``O(p³ + q³ + pq(p+q))``.

    Args:
        P: ``(p, p)`` symmetric (only its symmetric part is used).
        Q: ``(q, q)`` symmetric (only its symmetric part is used).
        C: ``(p, q)`` right-hand side.
        compute_dtype: dtype of the solve (default: the promoted input dtype, at least float32).

    Returns:
        ``X (p, q)`` in the promoted dtype of the inputs.

    Raises:
        ValueError: shapes that do not fit ``(p, p), (q, q), (p, q)``.
    """
    if P.ndim != 2 or Q.ndim != 2 or C.ndim != 2:
        raise ValueError(f"P, Q and C must be 2-d, got {P.ndim}, {Q.ndim} and {C.ndim} dims")
    p, q = C.shape
    if P.shape != (p, p) or Q.shape != (q, q):
        raise ValueError(
            f"Sylvester shapes do not fit: P {tuple(P.shape)}, Q {tuple(Q.shape)}, "
            f"C {tuple(C.shape)} (expected P ({p}, {p}) and Q ({q}, {q}))"
        )
    out_dtype = torch.promote_types(torch.promote_types(P.dtype, Q.dtype), C.dtype)
    dtype = compute_dtype or default_compute_dtype(P, Q, C)
    lam, U = symmetric_eigh(P.to(dtype))
    mu, V = symmetric_eigh(Q.to(dtype))
    return _sylvester_from_eigh(lam, U, mu, V, C.to(dtype)).to(out_dtype)


def lora_pro_x(
    A: Tensor,  # (…, r, n)
    B: Tensor,  # (…, m, r)
    grad_A: Tensor,  # (…, r, n)
    grad_B: Tensor,  # (…, m, r)
    *,
    scaling: float,
    damping: float,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""The free ``X (r, r)`` LoRA-Pro picks: the adjusted gradients closest to the LoRA gradients.

    With ``g_A(X)``, ``g_B(X)`` as in :func:`lora_pro_gradients`, ``X`` minimises

    .. math::

        f(X) = \tfrac12 \|g_A(X) - \nabla_A\|_F^2 + \tfrac12 \|g_B(X) - \nabla_B\|_F^2
               + \delta \|X\|_F^2

    whose stationarity condition is the symmetric Sylvester equation

    .. math::

        (B^T B + \delta I) X + X (A A^T + \delta I) = N - K
            - \tfrac{1}{s^2}\big((B^T B + \delta I)^{-1} N - B^T w_B\big)

    with ``N = ∇_A Aᵀ``, ``K = Bᵀ∇_B`` and ``w_B`` the ``B``-part of :func:`lora_pro_gradients`.
    For gradients of one ``G`` (``∇_A = s BᵀG``, ``∇_B = s G Aᵀ``, so ``N = K``) and ``δ = 0``
    this is the paper's equation ``BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ ∇_A Aᵀ``. The damping ``δ``
    regularises ``X`` so that the equation stays uniquely solvable for rank-deficient factors
    (``B = 0`` gives ``X = 0``). Cost ``O((m + n) r² + r³)``.

    Args:
        A: ``(…, r, n)``, the down factor; ``…`` are optional batch dims (a stack of pairs),
            the same on every argument.
        B: ``(…, m, r)``, the up factor (may be zero when ``damping > 0``).
        grad_A: ``∇_A (…, r, n)``, autograd's gradient of ``A`` (it includes ``s``).
        grad_B: ``∇_B (…, m, r)``, autograd's gradient of ``B``.
        scaling: ``s > 0``, the LoRA scale in ``W = W0 + s B A``.
        damping: ``δ >= 0``. ``δ = 0`` needs ``B`` of full column rank and ``A`` of full row
            rank; otherwise the result is not finite.
        compute_dtype: dtype of the r×r algebra (default: promoted inputs, at least float32).

    Returns:
        ``X (…, r, r)`` in the compute dtype.

    Raises:
        ValueError: mismatched shapes (trailing or batch dims), ``scaling <= 0`` or
            ``damping < 0``.
    """
    return _adjust(A, B, grad_A, grad_B, scaling, damping, "sylvester", compute_dtype)[2]


def lora_pro_gradients(
    A: Tensor,  # (…, r, n)
    B: Tensor,  # (…, m, r)
    grad_A: Tensor,  # (…, r, n)
    grad_B: Tensor,  # (…, m, r)
    *,
    scaling: float,
    damping: float,
    X: Tensor | str = "sylvester",  # (r, r), (…, r, r) or "sylvester"
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    r"""LoRA-Pro's adjusted gradients, which move ``W`` along ``G``'s tangent-space projection.

    With ``∇_A = s BᵀG`` and ``∇_B = s G Aᵀ`` (autograd's LoRA gradients for ``W = W0 + s B A``),

    .. math::

        g_A(X) &= \tfrac{1}{s^2} (B^T B + \delta I)^{-1} \nabla_A + X A \\
        g_B(X) &= \tfrac{1}{s^2} w_B - B X, \qquad
        w_B = \big(I - B (B^T B + \delta I)^{-1} B^T\big) \nabla_B (A A^T + \delta I)^{-1}

    so that, for every ``X``, the equivalent gradient ``s (B g_A + g_B A)`` is
    ``P_B G + G P_A − P_B G P_A``: the orthogonal projection of ``G`` onto the tangent space of
    the rank-r matrices at ``BA`` (exactly for ``δ = 0`` and full-rank factors; with damped
    projectors ``P_B = B(BᵀB + δI)⁻¹Bᵀ``, ``P_A = Aᵀ(AAᵀ + δI)⁻¹A`` otherwise). It does not depend
    on ``s``. ``X = "sylvester"`` (default) takes the ``X`` of :func:`lora_pro_x`; a tensor fixes
    it (``torch.zeros(r, r)`` is the cheapest choice when only the equivalent gradient matters).

    The ``(I − P_B)`` factor is applied as ``∇_B − B((BᵀB + δI)⁻¹(Bᵀ∇_B))``, never as an m×m
    matrix. The damped Gram systems are solved by Cholesky (``cholesky_ex``); should rounding make
    a factorisation fail, its factor is rebuilt from ``eigh`` with the eigenvalues clamped at zero,
    chosen on the device with ``torch.where`` (nothing is read back). ``B = 0`` (PEFT's init) is
    legal for ``δ > 0``: then ``g_A = 0``, ``X = 0`` and ``g_B = (1/s²) ∇_B (AAᵀ + δI)⁻¹``, the
    LoRA-FA update. Cost ``O((m + n) r² + r³)``: the dense ``G`` is never formed.

    Args:
        A: ``(…, r, n)``, the down factor; ``…`` are optional batch dims (a stack of pairs),
            the same on every argument.
        B: ``(…, m, r)``, the up factor.
        grad_A: ``∇_A (…, r, n)``, autograd's gradient of ``A`` (it includes ``s``).
        grad_B: ``∇_B (…, m, r)``, autograd's gradient of ``B``.
        scaling: ``s > 0``.
        damping: ``δ >= 0``, added to both Grams. ``δ = 0`` needs full-rank factors.
        X: ``"sylvester"`` or a fixed tensor: ``(r, r)`` for every member of a stack, or
            ``(…, r, r)`` one per member.
        compute_dtype: dtype of the r×r algebra (default: promoted inputs, at least float32).

    Returns:
        ``(g_A (…, r, n), g_B (…, m, r))`` in the dtypes of ``grad_A`` and ``grad_B``.

    Raises:
        ValueError: mismatched shapes (trailing or batch dims), ``scaling <= 0``,
            ``damping < 0`` or an unknown ``X``.

    Example:
        >>> A, B = torch.randn(2, 5), torch.randn(4, 2)
        >>> G = torch.randn(4, 5)
        >>> g_A, g_B = lora_pro_gradients(A, B, B.T @ G, G @ A.T, scaling=1.0, damping=0.0)
        >>> g_A.shape, g_B.shape
        (torch.Size([2, 5]), torch.Size([4, 2]))
    """
    g_A, g_B, _ = _adjust(A, B, grad_A, grad_B, scaling, damping, X, compute_dtype)
    return g_A.to(grad_A.dtype), g_B.to(grad_B.dtype)


def equivalent_gradient(
    A: Tensor,  # (…, r, n)
    B: Tensor,  # (…, m, r)
    g_A: Tensor,  # (…, r, n)
    g_B: Tensor,  # (…, m, r)
    *,
    scaling: float,
) -> Tensor:
    r"""Dense first-order change of ``W`` per unit step along ``(g_A, g_B)``: ``s(B g_A + g_B A)``.

    .. math::

        \tilde g = s\,(B\, g_A + g_B\, A), \qquad
        W(\eta) = W0 + s (B - \eta g_B)(A - \eta g_A) = W(0) - \eta \tilde g + O(\eta^2)

    **This forms an m×n matrix** (one per member of a stack). It is meant for tests, oracles
    and LoRA-Pro's ``full_adam`` mode (whose Adam moments are m×n anyway), not for low-rank
    paths.

    Args:
        A: ``(…, r, n)``; ``…`` are optional batch dims, the same on every argument.
        B: ``(…, m, r)``.
        g_A: ``(…, r, n)``, the direction of ``A``.
        g_B: ``(…, m, r)``, the direction of ``B``.
        scaling: ``s``.

    Returns:
        ``g̃ (…, m, n)`` in the promoted dtype of the inputs.

    Raises:
        ValueError: mismatched shapes (trailing or batch dims).
    """
    _check_shapes(A, B, g_A, g_B)
    return _addmm(g_B @ A, B, g_A).mul_(scaling)


def lora_pro_adam(
    A: Tensor,  # (…, r, n)
    B: Tensor,  # (…, m, r)
    grad_A: Tensor,  # (…, r, n)
    grad_B: Tensor,  # (…, m, r)
    exp_avg: Tensor,  # M (…, m, n)
    exp_avg_sq: Tensor,  # V (…, m, n)
    *,
    step: int | float,
    scaling: float,
    betas: tuple[float, float],
    eps: float,
    damping: float,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""One LoRA-Pro AdamW step (the paper's "full" mode): Adam on the equivalent gradient in the
    m×n space, projected back onto the factors.

    .. math::

        \tilde g &= s (B \hat g_A + \hat g_B A) \quad (\text{adjusted gradients with } X = 0) \\
        M_t &= \beta_1 M_{t-1} + (1 - \beta_1) \tilde g, \qquad
        V_t = \beta_2 V_{t-1} + (1 - \beta_2)\, \tilde g \odot \tilde g \\
        \Delta &= \frac{M_t / (1 - \beta_1^t)}{\sqrt{V_t} / \sqrt{1 - \beta_2^t} + \epsilon} \\
        (d_A, d_B) &= \text{lora\_pro\_gradients}(A, B,\ s B^T \Delta,\ s \Delta A^T)
        \quad (\text{Sylvester } X)

    The caller then steps ``A ← A − η d_A``, ``B ← B − η d_B``, which moves ``W`` by
    ``−η Proj_T(Δ) + O(η²)``: the Adam step projected onto the tangent space at ``BA``. ``t`` is
    the standard Adam counter, ``1`` on the first call (the official code's counter is one ahead).

    **Memory:** the moments are m×n, and the step makes a few m×n temporaries (``g̃``, the new
    moments, ``Δ``), all of them per member for a stack: a stack of ``G`` pairs holds them for
    all ``G`` at once. The m×n work (``O(m n r)``) runs in the compute dtype.

    Args:
        A: ``(…, r, n)``; ``…`` are optional batch dims (a stack of pairs), the same on every
            tensor argument.
        B: ``(…, m, r)``.
        grad_A: ``∇_A (…, r, n)``, autograd's gradient of ``A``.
        grad_B: ``∇_B (…, m, r)``, autograd's gradient of ``B``.
        exp_avg: ``M_{t-1} (…, m, n)``, zeros before the first step; not modified.
        exp_avg_sq: ``V_{t-1} (…, m, n)``, zeros before the first step; not modified.
        step: ``t >= 1``, the index of this step (one for the whole stack).
        scaling: ``s > 0``.
        betas: ``(β₁, β₂)``, each in ``[0, 1)``.
        eps: Adam's ``ε > 0``.
        damping: ``δ >= 0`` of :func:`lora_pro_gradients`.
        compute_dtype: dtype of all the algebra (default: promoted inputs, at least float32).

    Returns:
        ``(d_A (…, r, n), d_B (…, m, r), M_t (…, m, n), V_t (…, m, n))``, each in the dtype of
        the matching input (``A``, ``B``, ``exp_avg``, ``exp_avg_sq``).

    Raises:
        ValueError: mismatched shapes (trailing or batch dims), or ``step < 1``, ``eps <= 0``,
            betas out of ``[0, 1)``, ``scaling <= 0``, ``damping < 0``.
    """
    _check_shapes(A, B, grad_A, grad_B)
    moments = (*A.shape[:-2], B.shape[-2], A.shape[-1])  # (…, m, n)
    if exp_avg.shape != moments or exp_avg_sq.shape != moments:
        raise ValueError(
            f"moments must be {moments}, got {tuple(exp_avg.shape)} and {tuple(exp_avg_sq.shape)}"
        )
    if not step >= 1:
        raise ValueError(f"Invalid step: {step} (must be >= 1)")
    beta1, beta2 = betas
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"Invalid betas: {betas!r} (each must be in [0, 1))")
    if not eps > 0:
        raise ValueError(f"Invalid eps: {eps} (must be > 0)")
    dtype = compute_dtype or default_compute_dtype(A, B, grad_A, grad_B)
    A_c, B_c = A.to(dtype), B.to(dtype)
    # The equivalent gradient does not depend on X: X = 0 skips the Sylvester solve.
    r = A.shape[-2]
    zero = torch.zeros(*A.shape[:-2], r, r, dtype=dtype, device=A.device)
    g_A, g_B, _ = _adjust(A_c, B_c, grad_A, grad_B, scaling, damping, zero, dtype)
    g_eq = equivalent_gradient(A_c, B_c, g_A, g_B, scaling=scaling)
    M = torch.lerp(exp_avg.to(dtype), g_eq, 1.0 - beta1)
    V = (exp_avg_sq.to(dtype) * beta2).addcmul_(g_eq, g_eq, value=1.0 - beta2)
    # Δ = (M / (1 − β₁ᵗ)) / (√V / √(1 − β₂ᵗ) + ε), torch.optim.Adam's arrangement of ε.
    bias1, bias2 = 1.0 - beta1**step, 1.0 - beta2**step
    denom = V.sqrt().div_(math.sqrt(bias2)).add_(eps)
    delta = torch.div(M, denom, out=denom).div_(bias1)
    # Treat Δ as the full gradient: its LoRA gradients are s·BᵀΔ and s·ΔAᵀ.
    d_A, d_B, _ = _adjust(
        A_c, B_c, scaling * (B_c.mT @ delta), scaling * (delta @ A_c.mT), scaling, damping,
        "sylvester", dtype,
    )  # fmt: skip
    return d_A.to(A.dtype), d_B.to(B.dtype), M.to(exp_avg.dtype), V.to(exp_avg_sq.dtype)


# --- internals ---------------------------------------------------------------------------------


def _check_shapes(A: Tensor, B: Tensor, grad_A: Tensor, grad_B: Tensor) -> None:
    if A.ndim < 2 or B.ndim < 2 or A.shape[-2] != B.shape[-1]:
        raise ValueError(
            f"expected A (r, n) and B (m, r), or stacks (…, r, n) and (…, m, r), got shapes "
            f"{tuple(A.shape)} and {tuple(B.shape)}"
        )
    if A.shape[:-2] != B.shape[:-2]:
        raise ValueError(
            f"A and B must have the same batch dims, got shapes {tuple(A.shape)} and "
            f"{tuple(B.shape)} (batch dims {tuple(A.shape[:-2])} and {tuple(B.shape[:-2])})"
        )
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(
            f"gradients {tuple(grad_A.shape)}, {tuple(grad_B.shape)} do not match the factors "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}"
        )


def _adjust(
    A: Tensor,
    B: Tensor,
    grad_A: Tensor,
    grad_B: Tensor,
    scaling: float,
    damping: float,
    X: Tensor | str,
    compute_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(g_A, g_B, X)`` of :func:`lora_pro_gradients`, all in the compute dtype."""
    _check_shapes(A, B, grad_A, grad_B)
    if not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"Invalid scaling: {scaling} (must be > 0)")
    if not damping >= 0:
        raise ValueError(f"Invalid damping: {damping} (must be >= 0)")
    r, batch = A.shape[-2], tuple(A.shape[:-2])
    if isinstance(X, str):
        if X != "sylvester":
            raise ValueError(f"Invalid X: {X!r} (must be 'sylvester' or an (r, r) tensor)")
    elif X.shape not in ((r, r), (*batch, r, r)):
        stacked = f" or {(*batch, r, r)}" if batch else ""
        raise ValueError(f"X must be ({r}, {r}){stacked}, got {tuple(X.shape)}")
    dtype = compute_dtype or default_compute_dtype(A, B, grad_A, grad_B)
    A, B, grad_A, grad_B = A.to(dtype), B.to(dtype), grad_A.to(dtype), grad_B.to(dtype)
    inv_s2 = 1.0 / scaling**2

    gram_B, gram_A = B.mT @ B, A @ A.mT  # BᵀB, AAᵀ (r, r)
    lam_B, U_B = symmetric_eigh(gram_B)
    lam_A, U_A = symmetric_eigh(gram_A)
    # Grams are PSD: negative eigenvalues are rounding. Clamped, every λ + δ is >= δ.
    lam_B, lam_A = lam_B.clamp_min(0.0) + damping, lam_A.clamp_min(0.0) + damping
    L_B = _damped_cholesky(gram_B, damping, lam_B, U_B)
    L_A = _damped_cholesky(gram_A, damping, lam_A, U_A)

    u_A = torch.cholesky_solve(grad_A, L_B)  # (BᵀB + δI)⁻¹ ∇_A   (r, n)
    K = B.mT @ grad_B  # Bᵀ∇_B   (r, r)
    # w_B = (I − B(BᵀB + δI)⁻¹Bᵀ) ∇_B (AAᵀ + δI)⁻¹, the projector applied without forming m×m.
    residual_B = grad_B - B @ torch.cholesky_solve(K, L_B)
    w_B = torch.cholesky_solve(residual_B.mT, L_A).mT  # (m, r)

    if isinstance(X, str):
        N = grad_A @ A.mT  # ∇_A Aᵀ   (r, r)
        # Stationarity of f(X) (see lora_pro_x): N − K vanishes for gradients of one G.
        C = (N - K) - inv_s2 * (u_A @ A.mT - B.mT @ w_B)
        X = _sylvester_from_eigh(lam_B, U_B, lam_A, U_A, C)
    else:
        X = X.to(dtype)
    g_A = _addmm(u_A, X, A, alpha=1.0, beta=inv_s2)  # u_A / s² + X A
    g_B = _addmm(w_B, B, X, alpha=-1.0, beta=inv_s2)  # w_B / s² − B X
    return g_A, g_B, X


def _addmm(
    input: Tensor, mat1: Tensor, mat2: Tensor, *, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """``β·input + α·(mat1 @ mat2)`` in one kernel, batched over the leading dims of ``input``.

    2-d operands take ``torch.addmm`` (the unbatched path stays exactly what it was); stacks take
    ``torch.baddbmm`` over the flattened batch dims, with a 2-d ``mat1`` or ``mat2`` (a shared
    ``X``) broadcast to every member.
    """
    if input.ndim == mat1.ndim == mat2.ndim == 2:
        return torch.addmm(input, mat1, mat2, alpha=alpha, beta=beta)
    batch = input.shape[:-2]

    def flat(t: Tensor) -> Tensor:
        return t.expand(*batch, *t.shape[-2:]).flatten(0, -3)

    product = torch.baddbmm(flat(input), flat(mat1), flat(mat2), alpha=alpha, beta=beta)
    return product.view(input.shape)


def _sylvester_from_eigh(lam: Tensor, U: Tensor, mu: Tensor, V: Tensor, C: Tensor) -> Tensor:
    """``X = U [(Uᵀ C V) ⊘ (λ_i + μ_j)] Vᵀ``: ``P X + X Q = C`` for ``P = UΛUᵀ``, ``Q = VMVᵀ``.

    Batched: ``lam (…, p)``, ``U (…, p, p)``, ``mu (…, q)``, ``V (…, q, q)``, ``C (…, p, q)``.
    """
    return U @ ((U.mT @ C @ V) / (lam.unsqueeze(-1) + mu.unsqueeze(-2))) @ V.mT


def _damped_cholesky(gram: Tensor, damping: float, lam: Tensor, U: Tensor) -> Tensor:
    """A lower-triangular ``L`` with ``L Lᵀ = gram + δI``, usable by ``torch.cholesky_solve``.

    ``lam`` and ``U`` are the (clamped, damped) eigenpairs of the same matrix. If Cholesky fails
    (an indefinite Gram from rounding, with ``δ`` below its rounding level), ``L`` is rebuilt from
    them: ``gram + δI ≈ (U D)(U D)ᵀ`` with ``D = diag(√lam)``, and the QR factor ``R`` of
    ``(U D)ᵀ`` satisfies ``RᵀR = (U D)(U D)ᵀ``, so ``L = Rᵀ``. The choice is made by
    ``torch.where``, without reading ``info`` back from the device. Batched over leading dims
    (``gram (…, r, r)``, ``lam (…, r)``, ``U (…, r, r)``), each member chooses on its own.
    """
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    L, info = torch.linalg.cholesky_ex(gram + damping * eye)
    fallback = torch.linalg.qr((U * lam.sqrt().unsqueeze(-2)).mT, mode="r").R.mT
    return torch.where((info == 0)[..., None, None], L, fallback)
