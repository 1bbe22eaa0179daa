"""Test data builders: seeded random factors, gradients and targets with a chosen spectrum."""

from __future__ import annotations

import torch
from torch import Tensor


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=generator(seed), dtype=dtype)


def orthonormal(rows: int, cols: int, *, seed: int) -> Tensor:
    """A ``rows × cols`` matrix with orthonormal columns (``cols <= rows``), float64."""
    return torch.linalg.qr(randn(rows, cols, seed=seed)).Q


def with_spectrum(m: int, n: int, singular_values: Tensor, *, seed: int) -> tuple[Tensor, Tensor]:
    """A pair ``(P (m, k), Q (k, n))`` whose product has exactly the given singular values."""
    k = singular_values.numel()
    U, V = orthonormal(m, k, seed=seed), orthonormal(n, k, seed=seed + 1)
    return U * singular_values.double(), V.T


def lora_problem(m: int, n: int, r: int, N: int, *, seed: int, dtype=torch.float64):
    """Factors ``(B0, A0)``, inputs ``X (N, n)`` and output-gradients ``S (N, m)``."""
    g = generator(seed)
    B0 = torch.randn(m, r, generator=g, dtype=dtype)
    A0 = torch.randn(r, n, generator=g, dtype=dtype)
    X = torch.randn(N, n, generator=g, dtype=dtype)
    S = torch.randn(N, m, generator=g, dtype=dtype)
    return B0, A0, X, S


def well_conditioned(rows: int, cols: int, *, seed: int) -> Tensor:
    """A ``rows × cols`` float64 matrix of full rank with condition number at most 2.

    Orthonormal columns (or rows) scaled by singular values spread over [1, 2]: rounding in the
    r × r normal equations then stays near ε₆₄, so exactness claims can use tight bounds.
    """
    k = min(rows, cols)
    scales = torch.linspace(1.0, 2.0, k, dtype=torch.float64)
    U, V = orthonormal(rows, k, seed=seed), orthonormal(cols, k, seed=seed + 1)
    return (U * scales) @ V.T
