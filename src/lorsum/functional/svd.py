"""Truncated SVD: the dense Eckart–Young projection (SVDLoRA, oracles) and a randomized one.

``best_rank_r``, ``truncated_svd`` and ``gram_truncated_svd`` are dense by name: they take an
``(m, n)`` matrix. The randomized variant only multiplies its target by thin matrices, so it also
runs on a :class:`~lorsum.functional.terms.FactoredSum` without forming it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorsum.functional.linalg import default_compute_dtype
from lorsum.functional.terms import FactoredSum, _check_matrix

__all__ = [
    "balanced_factors",
    "best_rank_r",
    "gram_truncated_svd",
    "randomized_svd",
    "truncated_svd",
]


def truncated_svd(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``rank`` singular triplets of a dense matrix, or of each matrix of a stack.

    A stack is decomposed by one batched call: on a GPU that is one launch and one check of
    the solver's status for all of its matrices, where a loop pays both per matrix.

    Args:
        M: ``(m, n)`` dense matrix, or ``(G, m, n)``: ``G`` of them.
        rank: ``1 <= rank``; values above ``min(m, n)`` keep every triplet.

    Returns:
        ``U (…, m, k)``, ``S (…, k)`` (descending), ``Vh (…, k, n)`` with
        ``k = min(rank, m, n)``, in the dtype of ``M`` (computed in at least float32).

    Raises:
        ValueError: ``M`` neither 2-d nor 3-d, or ``rank < 1``.
    """
    M = _check_matrix_or_stack("M", M)
    _check_rank(rank)
    U, S, Vh = torch.linalg.svd(M.to(default_compute_dtype(M)), full_matrices=False)
    k = min(rank, S.shape[-1])
    return U[..., :k].to(M.dtype), S[..., :k].to(M.dtype), Vh[..., :k, :].to(M.dtype)


def gram_truncated_svd(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``rank`` singular triplets of a dense matrix (or stack), from the
    eigendecomposition of its smaller Gram matrix, in float64.

    For ``m <= n`` the left vectors are the top eigenvectors of ``M Mᵀ (m × m)``, the singular
    values the roots of its eigenvalues, and ``Vh = Σ⁻¹ Uᵀ M``; for ``m > n`` the same from
    ``Mᵀ M``. This is exact, not a sketch: the rank-``rank`` product ``U Σ Vh`` is the
    projection of ``M`` onto the top eigenvectors' span, ``U Uᵀ M`` (``M V Vᵀ`` for ``m > n``).
    Squaring ``M`` squares its condition number, which float64 absorbs: an eigenvalue's error
    is about ``ε₆₄ σ₁²``, so a singular value ``σ`` keeps a relative error near
    ``ε₆₄ (σ₁/σ)²`` (2e-8 at ``σ = 10⁻⁴ σ₁``), below float32's rounding, and the product is
    closer to the float64 truth than a float32 SVD's. An eigendecomposition of ``min(m, n)²``
    costs less than an SVD of ``m × n``.

    A direction whose singular value is zero has a zero vector on the side found by division.

    Args:
        M: ``(m, n)`` dense matrix, or ``(G, m, n)``: ``G`` of them. Its device must support
            float64 (CPU and CUDA do, MPS does not).
        rank: ``1 <= rank``; values above ``min(m, n)`` keep every triplet.

    Returns:
        ``U (…, m, k)``, ``S (…, k)`` (descending), ``Vh (…, k, n)`` with
        ``k = min(rank, m, n)``, in the dtype of ``M``.

    Raises:
        ValueError: ``M`` neither 2-d nor 3-d, or ``rank < 1``.
        torch.linalg.LinAlgError: the eigendecomposition did not converge (a non-finite ``M``).
    """
    M = _check_matrix_or_stack("M", M)
    _check_rank(rank)
    m, n = M.shape[-2:]
    k = min(rank, m, n)
    X = M.to(torch.float64)
    wide = m <= n
    gram = X @ X.mT if wide else X.mT @ X  # (…, p, p), p = min(m, n)
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values, vectors = values[..., -k:].flip(-1), vectors[..., -k:].flip(-1)
    S = values.clamp_min(0).sqrt()
    inverse = torch.where(S > 0, 1 / S, torch.zeros_like(S))
    if wide:
        U, Vh = vectors, inverse.unsqueeze(-1) * (vectors.mT @ X)
    else:
        U, Vh = (X @ vectors) * inverse.unsqueeze(-2), vectors.mT
    return U.to(M.dtype), S.to(M.dtype), Vh.to(M.dtype)


def best_rank_r(M: Tensor, rank: int) -> Tensor:
    """``Π_r(M)``: the best rank-``rank`` approximation of ``M`` in Frobenius norm (Eckart–Young).

    Dense: takes and returns an ``(m, n)`` matrix and runs a full SVD, ``O(m n min(m, n))``.
    This is SVDLoRA's projection and the oracle every LoRSum test compares against.
    """
    U, S, Vh = truncated_svd(_check_matrix("M", M), rank)
    return (U * S) @ Vh


def balanced_factors(U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``U diag(S) Vh`` into LoRA factors ``B = U S^½ (m, k)`` and ``A = S^½ Vh (k, n)``
    (each of a stack: ``U (…, m, k)``, ``S (…, k)``, ``Vh (…, k, n)``)."""
    root = S.clamp_min(0).sqrt()
    return U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh


def randomized_svd(
    target: Tensor | FactoredSum,
    rank: int,
    *,
    oversamples: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Approximate top-``rank`` SVD by a randomized range finder with power iterations.

    Sketches the range of ``T`` with ``l = rank + oversamples`` Gaussian probes, sharpens it with
    ``power_iters`` rounds of ``T Tᵀ`` (re-orthonormalised by QR after each product), then takes
    the exact SVD of the small ``(l, n)`` matrix ``Qᵀ T``. The error decays like
    ``(σ_{l+1}/σ_rank)^{2·power_iters+1}`` (Halko, Martinsson & Tropp, 2011, arXiv:0909.4061).

    Cost: ``2 (power_iters + 1)`` products of ``T`` with ``l`` vectors plus ``O((m + n) l²)``;
    with a :class:`FactoredSum` target nothing of size ``m × n`` is formed.

    A stack (a dense ``(G, m, n)`` or a :class:`FactoredSum` with a batch) is sketched with the
    same probes for every member, each operation batched over the stack.

    Args:
        target: ``T (m, n)``, dense or factored, or a stack of them.
        rank: number of triplets to return, ``>= 1``.
        oversamples: extra probes, ``>= 0`` (default: 10).
        power_iters: power iterations, ``>= 0`` (default: 2).
        generator: source of the Gaussian probes (default: torch's global generator).

    Returns:
        ``U (…, m, k)``, ``S (…, k)``, ``Vh (…, k, n)`` with ``k = min(rank, m, n)``.
    """
    _check_rank(rank)
    for name, value in (("oversamples", oversamples), ("power_iters", power_iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Invalid {name}: {value!r} (must be an int >= 0)")
    if isinstance(target, Tensor):
        dense = _check_matrix_or_stack("target", target)
        dtype = default_compute_dtype(dense)
        dense = dense.to(dtype)
        target = FactoredSum(
            pairs=(), dense=((1.0, dense),), shape=tuple(dense.shape[-2:]),
            batch=tuple(dense.shape[:-2]),
        )  # fmt: skip
        device = dense.device
    elif isinstance(target, FactoredSum):
        tensors = [P for _, P, _ in target.pairs] + [D for _, D in target.dense]
        if not tensors:
            raise ValueError("target is an empty FactoredSum")
        dtype, device = default_compute_dtype(*tensors), tensors[0].device
        target = target.to(dtype)
    else:
        raise TypeError(f"target must be a Tensor or FactoredSum, got {type(target).__name__}")
    m, n = target.shape
    width = min(rank + oversamples, m, n)
    # One set of probes for every member of a stack: each member's sketch is as random as alone.
    probes = torch.randn(n, width, generator=generator, dtype=dtype, device="cpu").to(device)
    Q = torch.linalg.qr(target.matmul(probes)).Q  # (…, m, l) orthonormal basis of the sketch
    for _ in range(power_iters):
        Z = torch.linalg.qr(target.rmatmul(Q).mT).Q  # (…, n, l): basis of Tᵀ Q
        Q = torch.linalg.qr(target.matmul(Z)).Q
    Ub, S, Vh = torch.linalg.svd(target.rmatmul(Q), full_matrices=False)  # Qᵀ T = Ub S Vh
    k = min(rank, S.shape[-1])
    return (Q @ Ub[..., :k]), S[..., :k], Vh[..., :k, :]


def _check_matrix_or_stack(name: str, x: object) -> Tensor:
    """``x`` as a real floating matrix ``(m, n)`` or a stack of them ``(G, m, n)``."""
    if isinstance(x, Tensor) and x.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be a matrix (m, n) or a stack of them (G, m, n), "
            f"got shape {tuple(x.shape)}"
        )
    return _check_matrix(name, x, tuple(x.shape[:-2]) if isinstance(x, Tensor) else ())


def _check_rank(rank: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r} (must be an int >= 1)")
