"""Feature-space low-rank math: moments of a layer's outputs, their top eigenbasis, and the rank
that keeps a given fraction of a spectrum's energy (LoRD's data-aware variant and rank rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

from lorsum.functional.terms import _check_matrix

__all__ = ["OutputStatistics", "energy_rank", "feature_basis"]


@dataclass(frozen=True)
class OutputStatistics:
    """First and second moments of a linear layer's outputs ``y = W x + b`` on calibration data.

    Only the moments are kept, never the outputs ``Y (N, m)`` themselves, so the memory is
    ``O(m²)`` whatever the number of calibration tokens ``N``.

    Attributes:
        second_moment: ``E[y yᵀ] = YᵀY / N``, ``(m, m)``, symmetric positive semi-definite.
        mean: ``μ = E[y] = Yᵀ1 / N``, ``(m,)``.
        count: ``N >= 1``, the number of output vectors (tokens) averaged.
    """

    second_moment: Tensor
    mean: Tensor
    count: int

    def __post_init__(self) -> None:
        second = _check_matrix("second_moment", self.second_moment)
        m = second.shape[0]
        if second.shape != (m, m):
            raise ValueError(f"second_moment must be square, got shape {tuple(second.shape)}")
        if not isinstance(self.mean, Tensor) or tuple(self.mean.shape) != (m,):
            shape = tuple(self.mean.shape) if isinstance(self.mean, Tensor) else None
            raise ValueError(f"mean must be a tensor of shape ({m},), got {shape}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"Invalid count: {self.count!r} (must be an int >= 1)")

    @property
    def size(self) -> int:
        """``m``, the number of output features."""
        return self.second_moment.shape[0]

    @staticmethod
    def from_outputs(outputs: Tensor) -> OutputStatistics:
        """The moments of ``outputs (..., m)`` (every leading index is one token), in float64.

        Float64 because the centred covariance is formed as ``E[yyᵀ] − μμᵀ``, which cancels
        digits when the mean is large next to the spread.
        """
        if not isinstance(outputs, Tensor) or outputs.ndim < 1 or outputs.numel() == 0:
            raise ValueError("outputs must be a non-empty tensor of shape (..., m)")
        Y = outputs.detach().reshape(-1, outputs.shape[-1]).to(torch.float64)
        N = Y.shape[0]
        return OutputStatistics(second_moment=Y.mT @ Y / N, mean=Y.mean(0), count=N)

    def covariance(self, *, center: bool, offset: Tensor | None = None) -> Tensor:
        """``E[(y − c)(y − c)ᵀ]``, ``(m, m)``, with ``c = μ`` if ``center`` else ``c = offset``.

        ``offset`` (default: zero) is the layer's bias ``b`` in LoRD's uncentred variant, whose
        error ``(I − P) W x`` lives in the outputs without their bias. It must be ``None`` when
        ``center`` is true.
        """
        S, mu = self.second_moment, self.mean
        if center:
            if offset is not None:
                raise ValueError("offset is only used when center=False")
            C = S - torch.outer(mu, mu)
        elif offset is None:
            C = S
        else:
            if tuple(offset.shape) != (self.size,):
                raise ValueError(f"offset has shape {tuple(offset.shape)}, expected ({self.size},)")
            c = offset.to(S.dtype)
            # E[(y − c)(y − c)ᵀ] = E[yyᵀ] − μcᵀ − cμᵀ + ccᵀ
            C = S - torch.outer(mu, c) - torch.outer(c, mu) + torch.outer(c, c)
        return 0.5 * (C + C.mT)  # exact symmetry for eigh


def feature_basis(covariance: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The top-``rank`` eigenvectors of a covariance, and its whole spectrum.

    ``Q_r Q_rᵀ y`` is then the best rank-``rank`` reconstruction of the features ``y`` whose
    second moment is ``C``: ``E‖y − P y‖²`` over orthogonal projectors ``P`` of rank ``r`` is
    minimised by ``P = Q_r Q_rᵀ`` with the value ``Σ_{i>r} λ_i`` (Ky Fan).

    Args:
        covariance: ``C (m, m)``, symmetric positive semi-definite (only its symmetric part is
            read).
        rank: ``1 <= rank <= m``.

    Returns:
        ``Q_r (m, rank)`` with orthonormal columns, ordered by decreasing eigenvalue, and the
        eigenvalues ``λ (m,)`` in decreasing order, clamped at zero, both in the dtype of ``C``
        promoted to at least float32. Eigenvectors of a repeated (or zero, when fewer than
        ``rank`` independent features were seen) eigenvalue are any orthonormal basis of their
        eigenspace.

    Raises:
        ValueError: ``C`` not square, or ``rank`` out of range.
    """
    C = _check_matrix("covariance", covariance)
    m = C.shape[0]
    if C.shape != (m, m):
        raise ValueError(f"covariance must be square, got shape {tuple(C.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= m:
        raise ValueError(f"Invalid rank: {rank!r} (must be an int with 1 <= rank <= {m})")
    C = C.to(torch.promote_types(C.dtype, torch.float32))
    eigvals, V = torch.linalg.eigh(0.5 * (C + C.mT))  # ascending
    return V.flip(-1)[:, :rank], eigvals.flip(-1).clamp_min(0)


def energy_rank(spectrum: Tensor, energy: float) -> int:
    """The smallest ``r`` whose ``r`` largest values hold at least ``energy`` of the total.

    With ``spectrum = σ²`` (squared singular values) this keeps ``energy`` of ``‖W‖_F²``; with the
    eigenvalues of a covariance it keeps ``energy`` of its trace. The values are sorted
    (descending) and negative ones (rounding in an ``eigh``) count as zero. A slack of
    ``len · ε · total`` (``ε`` of the spectrum's dtype) absorbs the rounding of the cumulative
    sum, so ``energy = 1`` stops at the last value that is not rounding noise instead of at the
    end of a numerically zero tail.

    Args:
        spectrum: ``(k,)`` non-negative values.
        energy: fraction in ``(0, 1]``.

    Returns:
        ``r`` with ``1 <= r <= k``; ``1`` for an all-zero spectrum.

    Raises:
        ValueError: ``energy`` outside ``(0, 1]``, or ``spectrum`` not a non-empty vector.
    """
    if isinstance(energy, bool) or not isinstance(energy, Real) or not 0 < energy <= 1:
        raise ValueError(f"Invalid energy: {energy!r} (must be in (0, 1])")
    if not isinstance(spectrum, Tensor) or spectrum.ndim != 1 or spectrum.numel() == 0:
        raise ValueError("spectrum must be a non-empty 1-d tensor")
    eps = torch.finfo(spectrum.dtype).eps if spectrum.is_floating_point() else 0.0
    values = spectrum.detach().to(torch.float64).clamp_min(0).sort(descending=True).values
    cumulative = values.cumsum(0)
    total = float(cumulative[-1])
    if not math.isfinite(total):
        raise ValueError(f"spectrum must be finite, its sum is {total}")
    if total == 0:
        return 1
    need = float(energy) * total - values.numel() * eps * total
    return min(int((cumulative < need).sum()) + 1, values.numel())
