"""Pivoted LU with the pivots pulled out, ``W = P L diag(d) Ū``: the factors of the LoLDU adapter.

``pivoted_ldu`` factors a dense ``(m, n)`` matrix once (``O(m n k)``). ``ldu_matmul`` applies
``P L diag(z) Ū`` to a batch of vectors in ``O((m + n) r)`` per vector; ``dense_ldu_product``
forms the ``(m, n)`` product and is dense by name (merging and tests only). The permutation is
always an index vector ``perm (m,)`` with ``P y = y[perm]``, never a dense ``m × m`` matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorsum.functional.linalg import default_compute_dtype
from lorsum.functional.terms import _check_matrix

__all__ = ["dense_ldu_product", "ldu_matmul", "pivoted_ldu"]


def pivoted_ldu(
    W: Tensor,
    *,
    rank: int | None = None,
    rtol: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The first ``rank`` steps of LU with partial pivoting, with the pivots as a diagonal.

    .. math::

        W = P L U = P L \\operatorname{diag}(d) Ū, \\qquad
        W ≈ P L_r \\operatorname{diag}(d_r) Ū_r \\text{ (first } r \\text{ steps)}

    ``P`` is the row permutation chosen by partial pivoting (LAPACK ``getrf``), ``L (m, k)`` is
    unit lower trapezoidal with ``|L_ij| <= 1``, ``d = diag(U)`` and ``Ū = diag(d)⁻¹ U`` is unit
    upper trapezoidal, ``k = min(m, n)``. The first ``r`` columns of ``L`` and rows of ``Ū`` are
    the first ``r`` elimination steps, *not* the ``r`` largest pivots.

    **Zero pivots.** A pivot with ``|U_ii| <= rtol · max|W|`` (an exactly or numerically singular
    step, e.g. for a rank-deficient ``W``) cannot be divided out. Row ``i`` of ``U`` is then
    divided by its own entry of largest magnitude ``c_i`` instead, so ``d_i = c_i`` and
    ``Ū_i = U_i / c_i`` has entries in ``[-1, 1]`` and a diagonal entry that is not 1 (it is
    ``U_ii / c_i``, possibly 0). When the whole row ``U_i`` is zero, ``d_i = 0`` and ``Ū_i`` is
    the unit row ``e_i``. In every case ``d_i Ū_i = U_i``, so ``P L diag(d) Ū = W`` holds to
    rounding, nothing is infinite, ``Ū`` stays upper trapezoidal, and every row of ``Ū`` is a
    non-zero direction that a trainable ``z_i`` can use.

    Args:
        W: ``(m, n)`` dense matrix; must be finite.
        rank: ``r``, the number of elimination steps kept, ``1 <= r <= min(m, n)``
            (default: ``min(m, n)``, the full factorisation).
        rtol: relative pivot tolerance, ``>= 0`` (default: ``max(m, n) · eps`` of the compute
            dtype, as ``torch.linalg.matrix_rank``). ``0`` treats only exact zeros as zero.
        compute_dtype: float32 or float64 (default: the dtype of ``W`` promoted to at least
            float32). The factorisation runs in it; the factors come back in ``W.dtype``.

    Returns:
        ``perm (m,)`` int64 with ``P y = y[perm]`` (so ``W = (L U)[perm]``), ``L_r (m, r)``,
        ``d_r (r,)``, ``Ū_r (r, n)``; the floating ones in ``W.dtype`` on ``W.device``.

    Raises:
        TypeError: ``W`` is not a real floating tensor.
        ValueError: ``W`` not 2-d or not finite, ``rank`` out of range, ``rtol < 0``, or a
            ``compute_dtype`` other than float32/float64.
    """
    W = _check_matrix("W", W)
    m, n = W.shape
    k = min(m, n)
    r = k if rank is None else rank
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= k:
        raise ValueError(f"Invalid rank: {rank!r} (must be an int with 1 <= rank <= {k})")
    if rtol is not None and not rtol >= 0:
        raise ValueError(f"Invalid rtol: {rtol} (must be >= 0)")
    dtype = default_compute_dtype(W) if compute_dtype is None else compute_dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"Invalid compute_dtype: {dtype} (must be torch.float32 or torch.float64)")
    A = W.to(dtype)
    if not bool(torch.isfinite(A).all()):
        raise ValueError("W has non-finite entries; LU needs a finite matrix")
    # ``_ex`` does not raise on a zero pivot (``info > 0``): those are handled below.
    LU, pivots, _ = torch.linalg.lu_factor_ex(A)
    perm = _permutation_from_pivots(pivots, m).to(W.device)
    L = torch.tril(LU[:, :r], diagonal=-1) + torch.eye(m, r, dtype=dtype, device=A.device)
    U = torch.triu(LU[:r, :])  # (r, n): the first r rows of U
    pivot = U.diagonal()
    if rtol is None:
        rtol = max(m, n) * torch.finfo(dtype).eps
    tol = rtol * A.abs().amax()
    # The zero-pivot fallback: divide row i by its largest-magnitude entry c_i (signed).
    peak = U.gather(1, U.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    divisor = torch.where(pivot.abs() > tol, pivot, peak)
    empty = divisor == 0  # the whole row U_i is zero: d_i = 0 and Ū_i = e_i
    divisor = torch.where(empty, torch.ones_like(divisor), divisor)
    unit_rows = torch.eye(r, n, dtype=dtype, device=A.device) * empty.unsqueeze(1)
    U_bar = U / divisor.unsqueeze(1) + unit_rows
    d = torch.where(empty, torch.zeros_like(divisor), divisor)
    return perm, L.to(W.dtype), d.to(W.dtype), U_bar.to(W.dtype)


def ldu_matmul(x: Tensor, perm: Tensor, L: Tensor, z: Tensor, U_bar: Tensor) -> Tensor:
    """``P L diag(z) Ū x`` for a batch of vectors, without forming anything ``m × n``.

    Computed as ``((x Ūᵀ) ⊙ z) (P L)ᵀ`` with ``P L = L[perm]``: ``O((m + n) r)`` per vector plus a
    gather of ``L`` (``O(m r)``, independent of the batch). Differentiable in ``x`` and ``z``
    (and in ``L``, ``Ū`` should they require grad).

    Args:
        x: ``(..., n)`` inputs (rows are tokens).
        perm: ``(m,)`` int64, ``P y = y[perm]``.
        L: ``L_r (m, r)``.
        z: ``(r,)`` diagonal.
        U_bar: ``Ū_r (r, n)``.

    Returns:
        ``(..., m)``, in the promoted dtype of the inputs.
    """
    return ((x @ U_bar.mT) * z) @ L[perm].mT


def dense_ldu_product(perm: Tensor, L: Tensor, z: Tensor, U_bar: Tensor) -> Tensor:
    """``P L diag(z) Ū`` as a dense ``(m, n)`` matrix (for merging and tests only).

    Args:
        perm: ``(m,)`` int64, ``P y = y[perm]``.
        L: ``(m, r)``.
        z: ``(r,)``.
        U_bar: ``(r, n)``.

    Returns:
        ``(m, n)`` in the promoted dtype of ``L``, ``z`` and ``U_bar``.
    """
    return ((L * z) @ U_bar)[perm]


def _permutation_from_pivots(pivots: Tensor, m: int) -> Tensor:
    """LAPACK's 1-based row swaps (``pivots (k,)``) as the index vector ``perm`` of ``P``.

    Step ``i`` swapped rows ``i`` and ``pivots[i] - 1``. Replaying the swaps on ``0..m-1`` gives
    ``rows`` with ``W[rows] = L U`` (that is ``Pᵀ W``); ``perm`` is its inverse, so that
    ``W = (L U)[perm]``. One host read of ``k`` integers, once per factorisation; never ``m × m``.
    """
    rows = list(range(m))
    for i, p in enumerate(pivots.tolist()):
        rows[i], rows[p - 1] = rows[p - 1], rows[i]
    perm = torch.empty(m, dtype=torch.int64)
    perm[torch.tensor(rows, dtype=torch.int64)] = torch.arange(m, dtype=torch.int64)
    return perm
