"""Riemannian / ScaledGD preconditioning of LoRA gradients by damped r×r Gram solves."""

from __future__ import annotations

import torch
from torch import Tensor

from lorsum.functional.linalg import default_compute_dtype, prox_solve

__all__ = ["riemannian_precondition"]


def riemannian_precondition(
    A: Tensor,  # (r, n)
    B: Tensor,  # (m, r)
    grad_A: Tensor,  # (r, n)
    grad_B: Tensor,  # (m, r)
    *,
    damping: float,
) -> tuple[Tensor, Tensor]:
    r"""The ScaledGD directions ``(BᵀB + δI)⁻¹ ∇_A`` and ``∇_B (AAᵀ + δI)⁻¹``.

    .. math::

        \hat g_A = (B^T B + \delta I)^{-1} \nabla_A, \qquad
        \hat g_B = \nabla_B (A A^T + \delta I)^{-1}

    The r×r systems are solved by damped Cholesky in at least float32 (``δ = 0`` is the
    ``δ → 0⁺`` limit of :func:`lorsum.functional.prox_solve`, with a zero anchor); the
    directions come back in the gradients' dtypes. Cost ``O((m + n) r² + r³)``.

    Args:
        A, B: the LoRA factors at which the preconditioners are built.
        grad_A, grad_B: the gradients to precondition (same shapes as ``A`` and ``B``).
        damping: ``δ >= 0``.

    Returns:
        ``(ĝ_A (r, n), ĝ_B (m, r))``.

    Reference:
        Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models",
        arXiv:2402.02347.
    """
    if grad_A.shape != A.shape or grad_B.shape != B.shape:
        raise ValueError(
            f"gradients {tuple(grad_A.shape)}, {tuple(grad_B.shape)} do not match the factors "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if not damping >= 0:
        raise ValueError(f"Invalid damping: {damping} (must be >= 0)")
    dtype = default_compute_dtype(A, B, grad_A, grad_B)
    A_c, B_c = A.to(dtype), B.to(dtype)
    gA, gB = grad_A.to(dtype), grad_B.to(dtype)
    pre_A = prox_solve(B_c.mT @ B_c, gA, torch.zeros_like(gA), damping)
    pre_B = prox_solve(A_c @ A_c.mT, gB.mT, torch.zeros_like(gB.mT), damping).mT
    return pre_A.to(grad_A.dtype), pre_B.to(grad_B.dtype)
