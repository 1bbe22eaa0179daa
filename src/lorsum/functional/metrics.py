"""Metrics of scaled LoRSum: K-FAC and Shampoo statistics from ``(X, S)``, their running averages,
damping and fractional power, and the preconditioning of a factored gradient term.

A linear layer with inputs ``X (N, n)`` and output-gradients ``S (N, m)`` has the gradient
``G = SᵀX (m, n)``. Its Kronecker metric is ``M_out ⊗ M_in`` with ``M_out (m)`` on the output side
and ``M_in (n)`` on the input side, each kept as a vector (diagonal) or a matrix (dense). Scaled
LoRSum then fits ``B A`` to ``B0A0 − lr · M_out⁻¹ G M_in⁻¹`` in the norm weighted by the metric.

Every function also takes a stack of layers: leading dims ``(…)`` on all of its tensors (the same
on each), one independent problem per index, as :func:`lorsum.functional.lorsum` takes them.
Reference: ``shared/spec/lorsum.md`` §3 and §5.3.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Literal

import torch
from torch import Tensor

from lorsum.functional.linalg import default_compute_dtype, symmetric_eigh
from lorsum.functional.terms import _check_matrix

__all__ = [
    "bias_corrected",
    "kfac_statistics",
    "metric_power",
    "precondition_pair",
    "running_average_",
    "shampoo_statistics",
]

LossReduction = Literal["mean", "sum"]


def kfac_statistics(
    inputs: Tensor,  # X (…, N, n)
    output_grads: Tensor,  # S (…, N, m)
    *,
    diagonal: bool = True,
    loss_reduction: LossReduction = "mean",
) -> tuple[Tensor, Tensor]:
    """K-FAC statistics of one batch: ``(a·SᵀS, XᵀX / N)``, or their diagonals.

    The input side is the second moment of the layer inputs, ``E[x xᵀ] = XᵀX / N``. The output side
    estimates the second moment of the *per-row* output-gradients: with a mean-reduced loss each
    row of ``S`` carries a factor ``1/N``, so ``a = N`` undoes it (``N Σ s sᵀ = E[ŝ ŝᵀ]``); with a
    sum-reduced loss ``a = 1/N``. This is the reference code's scaling (spec §5.3); a constant
    factor is absorbed by the damping and the learning rate anyway.

    Args:
        inputs: ``X (N, n)``, rows are tokens or samples; ``(…, N, n)`` for a stack of layers.
        output_grads: ``S (N, m)``, the gradient of the loss with respect to the layer output;
            ``(…, N, m)`` with the leading dims of ``inputs``.
        diagonal: return the diagonals ``(m,)`` and ``(n,)`` (default) instead of the matrices.
        loss_reduction: ``"mean"`` (default) or ``"sum"``: how the loss was reduced over rows.

    Returns:
        ``(out (…, m) or (…, m, m), in (…, n) or (…, n, n))`` in at least float32.

    Raises:
        ValueError: inputs that are not (stacks of) matrices with the same leading dims and rows,
            an empty batch, or an unknown ``loss_reduction``.
    """
    X, S, scale = _check_batch(inputs, output_grads, loss_reduction)
    N = X.shape[-2]
    if diagonal:
        return scale * S.square().sum(-2), X.square().sum(-2) / N
    return scale * (S.mT @ S), (X.mT @ X) / N


def shampoo_statistics(
    inputs: Tensor,  # X (…, N, n)
    output_grads: Tensor,  # S (…, N, m)
    *,
    diagonal: bool = True,
    loss_reduction: LossReduction = "mean",
) -> tuple[Tensor, Tensor]:
    """Shampoo statistics of one batch: ``(a·G Gᵀ, a·GᵀG)`` with ``G = SᵀX``, or their diagonals.

    ``a`` is the row scaling of :func:`kfac_statistics` (spec §5.3). The diagonals are computed
    without ever holding ``G``: through the ``N × N`` Grams ``SSᵀ`` and ``XXᵀ`` when that is
    cheaper (``2N(m + n) < m n``), otherwise from column blocks of ``G`` no larger than the inputs;
    either way the temporaries stay within ``N (m + n)`` elements per layer of a stack. The dense
    matrices are at least as large as ``G`` itself, so there ``G`` is formed once.

    Args, Returns and Raises: as :func:`kfac_statistics` (stacks included).
    """
    X, S, scale = _check_batch(inputs, output_grads, loss_reduction)
    N, n = X.shape[-2:]
    m = S.shape[-1]
    if not diagonal:
        G = S.mT @ X
        return scale * (G @ G.mT), scale * (G.mT @ G)
    if 2 * N * (m + n) < m * n:
        # GᵀG = Xᵀ(SSᵀ)X, so diag(GᵀG) = colsum(X ∘ (SSᵀ X)); likewise diag(GGᵀ) with XXᵀ.
        in_diag = (X * ((S @ S.mT) @ X)).sum(-2)
        out_diag = (S * ((X @ X.mT) @ S)).sum(-2)
        return scale * out_diag, scale * in_diag
    batch = X.shape[:-2]
    in_diag = X.new_empty(*batch, n)
    out_diag = X.new_zeros(*batch, m)
    block = max(1, (N * (m + n)) // m)  # keeps each G block (m, block) within the input size
    for start in range(0, n, block):
        G_block = S.mT @ X[..., start : start + block]  # G[:, block]   (…, m, b)
        squares = G_block.square()
        in_diag[..., start : start + block] = squares.sum(-2)
        out_diag += squares.sum(-1)
    return scale * out_diag, scale * in_diag


def running_average_(average: Tensor, new: Tensor, beta: float) -> Tensor:
    """In place: ``average ← β·average + (1 − β)·new``; returns ``average``.

    Elementwise, so any shape works (a diagonal, a dense matrix, a stack of either) as long as
    ``new`` has the shape of ``average``. Start ``average`` at zero and divide by ``1 − β^t``
    (:func:`bias_corrected`) to get an unbiased average after ``t`` updates.

    Raises:
        ValueError: ``β`` outside ``[0, 1)``, or ``new`` of another shape than ``average``.
    """
    _check_beta(beta)
    if average.shape != new.shape:
        raise ValueError(
            f"running average has shape {tuple(average.shape)} but the new statistic "
            f"{tuple(new.shape)}"
        )
    return average.mul_(beta).add_(new.to(average.dtype), alpha=1.0 - beta)


def bias_corrected(average: Tensor, beta: float, step: int) -> Tensor:
    """``average / (1 − β^step)``: the zero-started running average made unbiased (Adam's rule).

    Elementwise, any shape. A stack shares ``step``: members with other step counts need a call
    of their own.

    Raises:
        ValueError: ``β`` outside ``[0, 1)``, or ``step`` not an int ``>= 1``.
    """
    _check_beta(beta)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"Invalid step: {step!r} (must be an int >= 1)")
    return average / (1.0 - beta**step)


def metric_power(
    statistic: Tensor, *, damping: float, power: float, diagonal: bool | None = None
) -> Tensor:
    """``(C + δI)^p`` for a statistic ``C``: a vector (diagonal) or a symmetric PSD matrix.

    The damping is added before the power (spec §5.3). ``p = 0.5`` turns the preconditioned step
    ``M_out⁻¹ G M_in⁻¹`` into an RMS-normalised, Adam-like direction; ``p = 1`` is K-FAC's natural
    gradient; ``p < 0`` gives inverse powers. Negative eigenvalues that rounding leaves in a PSD
    statistic are clamped to zero. Dense matrices go through ``eigh`` in at least float32; in a
    stack a non-finite member gives NaN for itself alone (see
    ``lorsum.functional.linalg.symmetric_eigh``).

    Args:
        statistic: ``(d,)`` or ``(d, d)``; with ``diagonal`` given, a stack ``(…, d)`` of
            diagonals or ``(…, d, d)`` of matrices.
        damping: ``δ >= 0``; must be positive when ``p < 0``.
        power: ``p``, a finite real number.
        diagonal: ``None`` (default): the form is read from the shape, so ``statistic`` must be
            1-d or 2-d. ``True``: the last dim is a diagonal, every other dim a stack. ``False``:
            the last two dims are a square matrix, every other dim a stack. A stack has to say
            which, since ``(G, d)`` could be either when ``G = d``.

    Returns:
        A tensor of the shape of ``statistic`` in at least float32.

    Raises:
        ValueError: a statistic of another shape than the form asks for, a matrix that is not
            square, a non-finite or negative ``damping``, a non-finite ``power``, or ``p < 0``
            without damping.
    """
    if diagonal is not None and not isinstance(diagonal, bool):
        raise ValueError(f"Invalid diagonal: {diagonal!r} (must be None, True or False)")
    if not isinstance(statistic, Tensor):
        raise ValueError(f"statistic must be a tensor, got {type(statistic).__name__}")
    shape = tuple(statistic.shape)
    if diagonal is None:
        if statistic.ndim not in (1, 2):
            raise ValueError(
                f"statistic must be a vector (diagonal) or a square matrix, got {shape}; "
                "pass diagonal=True or False for a stack"
            )
        diagonal = statistic.ndim == 1
    if diagonal and statistic.ndim < 1:
        raise ValueError(f"a diagonal statistic needs at least 1 dim, got shape {shape}")
    if not diagonal and (statistic.ndim < 2 or shape[-1] != shape[-2]):
        raise ValueError(f"a dense statistic must be square, got shape {shape}")
    for name, value in (("damping", damping), ("power", power)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"Invalid {name}: {value!r} (must be a finite real number)")
    if damping < 0:
        raise ValueError(f"Invalid damping: {damping} (must be >= 0)")
    if power < 0 and damping == 0:
        raise ValueError(f"power {power} < 0 needs damping > 0, or a zero statistic gives inf")
    C = statistic.to(default_compute_dtype(statistic))
    if diagonal:
        return (C.clamp_min(0) + damping).pow(power)
    eigvals, V = symmetric_eigh(C)
    # V diag(w) Vᵀ, the eigenvalues scaling V's columns (one row of weights per matrix).
    return (V * (eigvals.clamp_min(0) + damping).pow(power).unsqueeze(-2)) @ V.mT


def precondition_pair(
    left: Tensor,  # P (…, m, k)
    right: Tensor,  # Q (…, k, n)
    metric_out: Tensor | None,  # (…, m) or (…, m, m)
    metric_in: Tensor | None,  # (…, n) or (…, n, n)
    *,
    not_positive_definite: str = "raise",
) -> tuple[Tensor, Tensor]:
    """``(M_out⁻¹ P, Q M_in⁻¹)``: the term ``P Q`` preconditioned on both sides, still factored.

    For the gradient term ``(Sᵀ, X)`` this is ``M_out⁻¹ G M_in⁻¹`` without forming ``G``. Diagonal
    metrics divide rows and columns; dense (SPD) metrics are solved by Cholesky. ``None`` is the
    identity. Cost: ``O(k (m + n))`` diagonal, ``O(m³ + n³ + k (m² + n²))`` dense.

    Stacks: leading dims on ``left`` make it a stack of terms; ``right`` and both metrics carry
    the same leading dims (a diagonal ``(…, m)``, a dense ``(…, m, m)``), one metric per term.

    Args:
        left, right: the term's factors ``P (…, m, k)`` and ``Q (…, k, n)``.
        metric_out, metric_in: the metrics, or ``None``.
        not_positive_definite: what a dense metric whose Cholesky factorisation fails gives:
            ``"raise"`` (default) a ``ValueError``, which reads one flag back from the device
            per dense metric (a host synchronisation on accelerators); ``"nan"`` NaN in that
            member's result and nothing read back, for callers whose finiteness guard then
            skips it (the optimizers). Diagonal metrics read nothing either way.

    Raises:
        ValueError: shapes that do not match, an unknown ``not_positive_definite``, or (with
            ``"raise"``) a dense metric that is not positive definite (the message names the
            first failing member of a stack).
    """
    batch = tuple(left.shape[:-2]) if isinstance(left, Tensor) and left.ndim > 2 else ()
    P = _check_matrix("left", left, batch)
    Q = _check_matrix("right", right, batch)
    if P.shape[-1] != Q.shape[-2]:
        raise ValueError(f"left {tuple(P.shape)} and right {tuple(Q.shape)} do not chain")
    if not_positive_definite not in ("raise", "nan"):
        raise ValueError(
            f"Invalid not_positive_definite: {not_positive_definite!r} (must be 'raise' or 'nan')"
        )
    raise_ = not_positive_definite == "raise"
    P_new = _solve_metric("metric_out", metric_out, P, batch, raise_)
    Q_new = _solve_metric("metric_in", metric_in, Q.mT, batch, raise_).mT
    return P_new, Q_new


def _solve_metric(
    name: str, metric: Tensor | None, X: Tensor, batch: tuple[int, ...], raise_: bool
) -> Tensor:
    """``M⁻¹ X`` for ``X (…, d, k)`` and a diagonal ``(…, d)`` or dense SPD ``(…, d, d)`` ``M``."""
    if metric is None:
        return X
    d = X.shape[-2]
    allowed = ((*batch, d), (*batch, d, d))
    if not isinstance(metric, Tensor) or tuple(metric.shape) not in allowed:
        raise ValueError(
            f"{name} has shape {tuple(getattr(metric, 'shape', ()))}; expected {allowed[0]} or "
            f"{allowed[1]}"
        )
    dtype = default_compute_dtype(metric, X)
    M, X = metric.to(dtype), X.to(dtype)
    if M.ndim == X.ndim - 1:  # a diagonal: one entry per row of X
        return X / M.unsqueeze(-1)
    L, info = torch.linalg.cholesky_ex(M)
    if not raise_:
        # Nothing read back: a member whose factorisation failed gives NaN, never a solve
        # with a partial factor, so a finiteness guard downstream skips it.
        failed = (info != 0).reshape(*info.shape, 1, 1)
        return torch.where(failed, float("nan"), torch.cholesky_solve(X, L))
    if bool(info.any()):
        failed = info.reshape(-1)
        first = int(failed.nonzero()[0])
        where = f" (member {first} of the stack)" if batch else ""
        raise ValueError(
            f"{name} is not positive definite{where} (Cholesky failed at column "
            f"{int(failed[first])}); add damping to the statistic before taking its power"
        )
    return torch.cholesky_solve(X, L)


def _check_batch(
    inputs: Tensor, output_grads: Tensor, loss_reduction: str
) -> tuple[Tensor, Tensor, float]:
    batch = tuple(inputs.shape[:-2]) if isinstance(inputs, Tensor) and inputs.ndim > 2 else ()
    X = _check_matrix("inputs", inputs, batch)
    S = _check_matrix("output_grads", output_grads, batch)
    if X.shape[-2] != S.shape[-2]:
        raise ValueError(
            f"inputs has {X.shape[-2]} rows but output_grads has {S.shape[-2]}; "
            "rows must be the same tokens"
        )
    if X.shape[-2] == 0:
        raise ValueError("the batch is empty (0 rows)")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"Invalid loss_reduction: {loss_reduction!r} (must be 'mean' or 'sum')")
    N = X.shape[-2]
    dtype = default_compute_dtype(X, S)
    scale = float(N) if loss_reduction == "mean" else 1.0 / N
    return X.to(dtype), S.to(dtype), scale


def _check_beta(beta: object) -> None:
    if isinstance(beta, bool) or not isinstance(beta, Real) or not 0.0 <= beta < 1.0:
        raise ValueError(f"Invalid beta: {beta!r} (must satisfy 0 <= beta < 1)")
