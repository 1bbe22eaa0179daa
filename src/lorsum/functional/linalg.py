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
    """Solve the proximal ridge problem ``Z = (K + λI)⁻¹ (R + λ Z₀)``.

    ``Z`` minimises ``½ tr(Zᵀ K Z) − tr(Zᵀ R) + (λ/2)‖Z − Z₀‖²``, one exact half-step of LoRSum.

    For ``λ > 0`` the system is symmetric positive definite and is solved by a Cholesky
    factorisation (``cholesky_ex``, never an explicit inverse). Should rounding make the
    factorisation fail (``K`` with a huge norm next to a tiny ``λ``), the same system is solved
    through ``eigh`` with the eigenvalues of ``K`` clamped at zero: a documented fallback, never an
    identity. Checking that failure flag reads one integer back from the device.

    For ``λ = 0`` the problem is the limit ``λ → 0⁺`` of the damped one, which exists even when
    ``K`` is singular (for example ``B = 0``, the standard LoRA start): on the range of ``K`` it is
    the least-squares solution ``K⁺R``, and along the null space of ``K`` (directions the objective
    does not see) it keeps the anchor ``Z₀``. Eigenvalues below ``r·eps·max(eig)`` count as zero.

    Args:
        gram: ``K (r, r)``, symmetric positive semi-definite.
        rhs: ``R (r, c)``.
        anchor: ``Z₀ (r, c)``.
        damping: ``λ >= 0``.

    Returns:
        ``Z (r, c)`` in the dtype of ``gram``.
    """
    r = gram.shape[-1]
    if damping > 0:
        system = gram + damping * torch.eye(r, dtype=gram.dtype, device=gram.device)
        L, info = torch.linalg.cholesky_ex(system)
        rhs = rhs + damping * anchor
        if not bool(info.any()):
            return torch.cholesky_solve(rhs, L)
        return _eigh_prox_solve(gram, rhs, anchor, damping)
    return _eigh_prox_solve(gram, rhs, anchor, 0.0)


def symmetric_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric part of ``M (…, r, r)`` that never raises.

    Grams formed as products are symmetric only up to rounding, so the symmetric part is
    decomposed. A non-finite ``M`` (a NaN gradient upstream) or a LAPACK failure to converge (a
    finite but astronomically large Gram, as in a diverging run) gives NaN eigenvalues and
    vectors instead of an exception, so the optimizers' finiteness guards skip that step. No
    value is read back from the device except when ``eigh`` itself raises.
    """
    finite = torch.isfinite(M).all()
    safe = torch.where(finite, 0.5 * (M + M.mT), torch.zeros_like(M))
    try:
        eigvals, V = torch.linalg.eigh(safe)
    except torch.linalg.LinAlgError:
        return torch.full_like(M[..., 0], float("nan")), torch.full_like(M, float("nan"))
    nan = float("nan")
    return torch.where(finite, eigvals, nan), torch.where(finite, V, nan)


def _eigh_prox_solve(gram: Tensor, rhs: Tensor, anchor: Tensor, damping: float) -> Tensor:
    """``eigh`` form of :func:`prox_solve`; ``rhs`` already contains ``λ Z₀`` when ``λ > 0``.

    A non-finite Gram, or one ``eigh`` cannot decompose, gives NaN (see :func:`symmetric_eigh`).
    """
    eigvals, V = symmetric_eigh(gram)
    eigvals = eigvals.clamp_min(0.0)
    Vt_rhs = V.mT @ rhs
    if damping > 0:
        solution = V @ (Vt_rhs / (eigvals + damping).unsqueeze(-1))
    else:
        eps = torch.finfo(gram.dtype).eps
        threshold = eigvals.amax(dim=-1, keepdim=True) * (gram.shape[-1] * eps)
        seen = eigvals > threshold.clamp_min(torch.finfo(gram.dtype).tiny)
        # On the range of K: K⁺R. On its null space the λ → 0⁺ limit keeps the anchor's coordinates.
        coords = torch.where(
            seen.unsqueeze(-1),
            Vt_rhs / torch.where(seen, eigvals, 1.0).unsqueeze(-1),
            V.mT @ anchor,
        )
        solution = V @ coords
    return solution
