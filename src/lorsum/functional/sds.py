"""SDS-LoRA's algebra: the function-preserving re-split of a LoRA pair and the basis refresh.

SDS-LoRA (spec ``related-methods.md`` §2) trains ``ΔW = s (B Q_A + Q_B A)`` where ``Q_B (m, r)``
and ``Q_A (r, n)`` are frozen orthonormal bases, so the gradients ``s G Q_Aᵀ`` and ``s Q_Bᵀ G``
reach ``B`` and ``A`` without being scaled by their singular values. Everything here works on
thin matrices: QR of ``(m, r)`` and ``(n, r)`` factors and one ``r × r`` SVD; nothing ``m × n`` is
formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorsum.functional.linalg import default_compute_dtype

__all__ = ["sds_activate", "sds_refresh", "sds_refresh_due"]


def sds_activate(A: Tensor, B: Tensor, scaling: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Re-split a LoRA pair into SDS-LoRA's two branches, preserving ``s B A`` exactly.

    With ``s B A = U Σ Vᵀ`` (a thin QR of ``B`` and of ``Aᵀ``, then the SVD of the ``r × r``
    product of their triangles), the bases are ``Q_B = U`` and ``Q_A = Vᵀ`` and the trained
    factors ``B' = U Σ / (2s)``, ``A' = Σ Vᵀ / (2s)``, so that ``s (B' Q_A + Q_B A') = U Σ Vᵀ``.

    Args:
        A: ``(r, n)`` LoRA down factor.
        B: ``(m, r)`` LoRA up factor.
        scaling: the LoRA scale ``s > 0``.

    Returns:
        ``(A', B', Q_A, Q_B)`` with shapes ``(r, n)``, ``(m, r)``, ``(r, n)``, ``(m, r)``, in the
        input dtype. A rank-deficient product gets zero singular values: the bases stay
        orthonormal (the SVD completes them) and the re-split is still exact.

    Raises:
        ValueError: mismatched shapes, ``r > min(m, n)`` or a non-positive scaling.
    """
    r, n = A.shape
    m = B.shape[0]
    if B.shape[1] != r:
        raise ValueError(f"B must be (m, {r}) to match A {tuple(A.shape)}, got {tuple(B.shape)}")
    if r > min(m, n):
        raise ValueError(f"rank {r} exceeds min(m, n) = {min(m, n)}: no orthonormal basis exists")
    if not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling}")
    dtype = default_compute_dtype(A, B)
    Q_b, R_b = torch.linalg.qr(B.to(dtype))  # (m, r), (r, r)
    Q_a, R_a = torch.linalg.qr(A.to(dtype).T)  # (n, r), (r, r)
    U, sigma, Vh = torch.linalg.svd(scaling * R_b @ R_a.T)  # core: s B A = Q_b (core) Q_aᵀ
    basis_B = Q_b @ U  # (m, r)
    basis_A = Vh @ Q_a.T  # (r, n)
    half = sigma / (2 * scaling)
    new_B = basis_B * half  # U Σ / (2s)
    new_A = half[:, None] * basis_A  # Σ Vᵀ / (2s)
    return tuple(t.to(A.dtype) for t in (new_A, new_B, basis_A, basis_B))  # type: ignore[return-value]


def sds_refresh(
    A: Tensor, B: Tensor, basis_A: Tensor, basis_B: Tensor, *, norm_floor: float = 1e-2
) -> tuple[Tensor, Tensor] | None:
    """New bases spanning ``row(A)`` and ``col(B)``, or ``None`` when the refresh is skipped.

    ``Q_A ← orth(Aᵀ)ᵀ`` and ``Q_B ← orth(B)`` by thin QR, each column's sign chosen so that it
    agrees with the previous basis (``diag(Q_newᵀ Q_old) ≥ 0``), which keeps a refresh right after
    :func:`sds_activate` a no-op whatever signs the QR picks. A layer whose ``B`` has a column, or
    whose ``A`` has a row, of norm ``≤ norm_floor`` is skipped: its basis would be noise.

    The refresh is not function-preserving in general: the layer's ``ΔW`` changes by
    ``s (B (Q_A' − Q_A) + (Q_B' − Q_B) A)``, as in the method's reference code.

    Args:
        A: ``(r, n)``; B: ``(m, r)``; basis_A: ``(r, n)`` and basis_B: ``(m, r)``, the current
            bases; norm_floor: the skip threshold.

    Returns:
        ``(basis_A', basis_B')`` in the input dtype, or ``None``.
    """
    dtype = default_compute_dtype(A, B)
    A, B = A.to(dtype), B.to(dtype)
    if bool((B.norm(dim=0) <= norm_floor).any()) or bool((A.norm(dim=1) <= norm_floor).any()):
        return None
    Q_b, _ = torch.linalg.qr(B)  # (m, r)
    Q_a, _ = torch.linalg.qr(A.T)  # (n, r)
    # Align each new direction with the old one (a sign, never a rotation).
    Q_b = Q_b * _signs((Q_b * basis_B.to(dtype)).sum(dim=0))
    Q_a = Q_a * _signs((Q_a * basis_A.to(dtype).T).sum(dim=0))
    return Q_a.T.to(basis_A.dtype), Q_b.to(basis_B.dtype)


def sds_refresh_due(
    step: int, total_steps: int, *, warmup_steps: int = 10, phases: int = 5
) -> bool:
    """Whether the bases are refreshed after optimizer step ``step`` (1-based).

    The reference schedule: the ``total_steps`` are split into ``phases`` equal phases; in phase
    ``k = 0 … phases − 1`` the bases are refreshed every ``k + 1`` steps, i.e. when
    ``step mod (k + 1) == 0`` with ``k = ⌊step / (total_steps / phases)⌋`` (capped at the last
    phase), and never during the warm-up (``step ≤ warmup_steps``).
    """
    if total_steps < 1 or phases < 1:
        raise ValueError(f"need total_steps ≥ 1 and phases ≥ 1, got {total_steps} and {phases}")
    if step <= warmup_steps:
        return False
    phase = min(int(step * phases // total_steps), phases - 1)
    return step % (phase + 1) == 0


def _signs(alignment: Tensor) -> Tensor:
    return torch.where(alignment < 0, -1.0, 1.0).to(alignment.dtype)
