"""Trained rank pruning's algebra: the energy rule, the truncation, its nuclear-norm subgradient,
and a warm-started truncation that replaces the SVD by LoRSum sweeps (spec
``related-methods.md`` §7).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lorsum.functional.als import lorsum
from lorsum.functional.feature import energy_rank
from lorsum.functional.linalg import default_compute_dtype

__all__ = ["Truncation", "energy_truncation", "warm_energy_truncation"]


class Truncation(NamedTuple):
    """``weight ≈ U diag(S) Vh`` at rank ``k``: ``U (m, k)``, ``S (k,)``, ``Vh (k, n)``."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[0])

    def weight(self) -> Tensor:
        """``U diag(S) Vh``, the truncated weight ``T(W)`` (m, n)."""
        return (self.U * self.S) @ self.Vh

    def subgradient(self) -> Tensor:
        """``U Vh``: a subgradient of the nuclear norm at ``T(W)`` (m, n)."""
        return self.U @ self.Vh


def energy_truncation(weight: Tensor, energy: float) -> Truncation:
    """``T(W)``: ``weight (m, n)`` truncated (by a full SVD) to the smallest rank that keeps
    ``energy`` of ``‖W‖²_F`` (:func:`~lorsum.functional.energy_rank` of ``σ²``)."""
    dtype = default_compute_dtype(weight)
    U, S, Vh = torch.linalg.svd(weight.to(dtype), full_matrices=False)
    k = energy_rank(S.square(), energy)
    return Truncation(U[:, :k].to(weight.dtype), S[:k].to(weight.dtype), Vh[:k].to(weight.dtype))


def warm_energy_truncation(
    weight: Tensor, previous: Truncation, energy: float, *, sweeps: int = 2
) -> Truncation | None:
    """The truncation of ``weight`` started from the previous one, without a full SVD.

    Between two projections the weight moves a little, so the previous factors are a good start:
    ``sweeps`` LoRSum sweeps (alternating least squares, ``damping = 0``) fit a rank-``k`` model
    of ``weight`` from ``previous`` (``k = previous.rank``), a thin QR + ``k × k`` SVD puts it in
    SVD form, and the energy rule is applied to its singular values against ``‖weight‖²_F``. The
    rank can shrink this way; it cannot grow: when the fit keeps less than ``energy`` of the
    energy, ``None`` is returned and the caller falls back to :func:`energy_truncation`.

    Cost: ``O(sweeps · m n k)`` instead of the SVD's ``O(m n min(m, n))``.
    """
    dtype = default_compute_dtype(weight)
    W = weight.to(dtype)
    B0 = (previous.U * previous.S).to(dtype)  # (m, k)
    A0 = previous.Vh.to(dtype)  # (k, n)
    B, A = lorsum([W], [1.0], (B0, A0), num_iters=sweeps, damping=0.0)
    Q_b, R_b = torch.linalg.qr(B)
    Q_a, R_a = torch.linalg.qr(A.T)
    U_core, S, Vh_core = torch.linalg.svd(R_b @ R_a.T)
    total = float(W.pow(2).sum())
    if float(S.pow(2).sum()) < energy * total * (1 - 1e-12):
        return None
    k = energy_rank(torch.cat([S.square(), (total - S.square().sum()).clamp_min(0)[None]]), energy)
    k = min(k, S.numel())
    U = (Q_b @ U_core)[:, :k]
    Vh = (Vh_core @ Q_a.T)[:k]
    return Truncation(U.to(weight.dtype), S[:k].to(weight.dtype), Vh.to(weight.dtype))
