"""Small dense linear algebra shared by the low-rank methods: r×r proximal solves and dtypes."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["default_compute_dtype", "prox_solve", "symmetric_eigh"]


def default_compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype of the r×r algebra: the promoted input dtype, but at least float32.

    bf16/fp16 Grams lose the small eigenvalues that decide the solve, so they are never used;
    float64 inputs stay float64 so that float64 oracles can be matched to rounding.
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def prox_solve(gram: Tensor, rhs: Tensor, anchor: Tensor, damping: float) -> Tensor:
    """Solve the proximal ridge problem ``Z = (K + λI)⁻¹ (R + λ Z₀)``, batched over leading dims.

    ``Z`` minimises ``½ tr(Zᵀ K Z) − tr(Zᵀ R) + (λ/2)‖Z − Z₀‖²``, one exact half-step of LoRSum.

    For ``λ > 0`` the system is symmetric positive definite and is solved by a Cholesky
    factorisation (``cholesky_ex``) and two triangular solves, never an explicit inverse, and
    without reading any value back from the device: an optimizer step built on it runs without
    host synchronisation. A computed Gram is positive semi-definite only up to rounding, so with a
    tiny ``λ`` next to a huge ``‖K‖`` the factorisation can fail; such a system is factored again
    with the shift ``τ = r·ε·tr(K)`` added, the size of the rounding in ``K`` itself, so the answer
    is as accurate as the precision allows. A system that still fails (a Gram that is not even
    approximately semi-definite, or not finite) gives NaN, which the optimizers' finiteness guard
    turns into a skipped, counted step: never a silent identity or a garbage solution.

    For ``λ = 0`` the problem is the limit ``λ → 0⁺`` of the damped one, which exists even when
    ``K`` is singular (for example ``B = 0``, the standard LoRA start): on the range of ``K`` it is
    the least-squares solution ``K⁺R``, and along the null space of ``K`` (directions the objective
    does not see) it keeps the anchor ``Z₀``. Eigenvalues below ``r·eps·max(eig)`` count as zero.
    This path uses ``eigh``, whose convergence check reads a flag back from the device.

    Args:
        gram: ``K (…, r, r)``, symmetric positive semi-definite.
        rhs: ``R (…, r, c)``.
        anchor: ``Z₀ (…, r, c)``.
        damping: ``λ >= 0``.

    Returns:
        ``Z (…, r, c)`` in the dtype of ``gram``.
    """
    if damping > 0:
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        system = gram + damping * eye
        L, info = torch.linalg.cholesky_ex(system)
        shift = _rounding_shift(gram)
        L_shifted, info_shifted = torch.linalg.cholesky_ex(system + shift[..., None, None] * eye)
        factored = (info == 0)[..., None, None]
        L = torch.where(factored, L, L_shifted)
        solution = _cholesky_solve(L, rhs + damping * anchor)
        solved = factored | (info_shifted == 0)[..., None, None]
        return torch.where(solved, solution, float("nan"))
    return _limit_prox_solve(gram, rhs, anchor)


def _rounding_shift(gram: Tensor) -> Tensor:
    """``r·ε·tr(K)`` per matrix: the size of the rounding a computed ``r×r`` Gram carries."""
    r = gram.shape[-1]
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).abs()
    return r * torch.finfo(gram.dtype).eps * trace


def _cholesky_solve(L: Tensor, rhs: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹ rhs`` by two triangular solves: plain BLAS, no status flag to check."""
    y = torch.linalg.solve_triangular(L, rhs, upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True)


def symmetric_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric part of ``M (…, r, r)`` that never raises.

    Grams formed as products are symmetric only up to rounding, so the symmetric part is
    decomposed. A non-finite ``M`` (a NaN gradient upstream) or a LAPACK failure to converge (a
    finite but astronomically large Gram, as in a diverging run) gives NaN eigenvalues and
    vectors instead of an exception, so the optimizers' finiteness guards skip that step. In a
    stack ``(G, r, r)`` a non-finite member gives NaN for itself alone; a failure to converge,
    which LAPACK reports for the whole call, gives NaN for the whole stack. No value is read
    back from the device except when ``eigh`` itself raises.
    """
    # Per matrix: in a stack, one non-finite member must not blank the others.
    finite = torch.isfinite(M).flatten(-2).all(-1)[..., None, None]
    safe = torch.where(finite, 0.5 * (M + M.mT), torch.zeros_like(M))
    try:
        eigvals, V = torch.linalg.eigh(safe)
    except torch.linalg.LinAlgError:
        return torch.full_like(M[..., 0], float("nan")), torch.full_like(M, float("nan"))
    nan = float("nan")
    return torch.where(finite[..., 0], eigvals, nan), torch.where(finite, V, nan)


def _limit_prox_solve(gram: Tensor, rhs: Tensor, anchor: Tensor) -> Tensor:
    """The ``λ → 0⁺`` limit of :func:`prox_solve`: ``K⁺R`` on the range of ``K``, ``Z₀`` off it.

    A non-finite Gram, or one ``eigh`` cannot decompose, gives NaN (see :func:`symmetric_eigh`).
    """
    eigvals, V = symmetric_eigh(gram)
    eigvals = eigvals.clamp_min(0.0)
    eps = torch.finfo(gram.dtype).eps
    threshold = eigvals.amax(dim=-1, keepdim=True) * (gram.shape[-1] * eps)
    seen = eigvals > threshold.clamp_min(torch.finfo(gram.dtype).tiny)
    coords = torch.where(
        seen.unsqueeze(-1),
        (V.mT @ rhs) / torch.where(seen, eigvals, 1.0).unsqueeze(-1),
        V.mT @ anchor,
    )
    return V @ coords
