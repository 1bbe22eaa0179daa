"""LoRSum: the rank-r fit of a weighted sum of factored matrices by alternating least squares.

Reference: "Beyond SGD, Without SVD" (LoRSum), arXiv:2602.16456, and ``shared/spec/lorsum.md`` §2–3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor

from lorsum.functional.linalg import default_compute_dtype, prox_solve
from lorsum.functional.terms import FactoredSum, Term, _check_matrix

__all__ = ["lorsum", "lorsum_iterates"]

Reduce = Callable[[list[Tensor]], list[Tensor]]
"""Averages each tensor of a list over the data-parallel ranks (shapes and dtypes kept)."""


def lorsum(
    terms: Sequence[Term],  # each (P (m, k_i), Q (k_i, n)) or dense (m, n)
    weights: Sequence[float | Tensor],  # one scalar per term
    init: tuple[Tensor, Tensor],  # (B0 (…, m, r), A0 (…, r, n)); B0 may be zero
    *,
    num_iters: int = 1,
    damping: float = 0.0,
    metric_out: Tensor | None = None,  # (…, m) diagonal or (…, m, m) SPD
    metric_in: Tensor | None = None,  # (…, n) diagonal or (…, n, n) SPD
    tol: float = 0.0,
    compute_dtype: torch.dtype | None = None,
    reduce: Reduce | None = None,  # averages half-step products over the data-parallel ranks
    local_terms: Sequence[int] = (),  # indices of the terms that hold one rank's share of T
) -> tuple[Tensor, Tensor]:
    r"""Rank-r fit ``B A ≈ T = Σ_i w_i P_i Q_i`` by alternating least squares, never forming ``T``.

    Minimises, over ``B (m, r)`` and ``A (r, n)``,

    .. math::

        F(B, A) = \tfrac12 \|M_{out}^{1/2}(BA - T)M_{in}^{1/2}\|_F^2
                  + \tfrac{\lambda}{2}\big(\|M_{out}^{1/2}(B - B_0)\|_F^2
                  + \|(A - A_0)M_{in}^{1/2}\|_F^2\big)

    with ``λ = damping`` and identity metrics unless ``metric_out``/``metric_in`` are given. Each
    half-step minimises ``F`` exactly in one factor (a ridge problem with an r×r system), so ``F``
    never increases along the half-steps:

    .. math::

        A &\leftarrow (B^T M_{out} B + \lambda I)^{-1}(B^T M_{out} T + \lambda A_0) \\
        B &\leftarrow (T M_{in} A^T + \lambda B_0)(A M_{in} A^T + \lambda I)^{-1}

    Products with ``T`` contract through each term's inner size ``k_i`` first, so one sweep costs
    about ``4 r Σ_i k_i (m + n)`` flops and allocates nothing of size ``m × n`` when every term is a
    pair. For the LoRA step pass ``terms = [(B0, A0), (Sᵀ, X)]`` and ``weights = [1, -lr]``
    (``G = SᵀX``); the scaled variant passes the preconditioned gradient term
    ``(M_out⁻¹Sᵀ, X M_in⁻¹)`` (see :func:`lorsum.functional.precondition_pair`).

    What the sweeps compute:

    * ``num_iters = 0``: one Jacobi pass, both half-steps from the init. For the LoRA step this is
      the Riemannian / ScaledGD preconditioned step ``A⁺ = A0 − lr (B0ᵀB0 + λI)⁻¹ B0ᵀG``,
      ``B⁺ = B0 − lr G A0ᵀ (A0A0ᵀ + λI)⁻¹``.
    * ``num_iters = k >= 1``: ``k`` Gauss–Seidel sweeps, A then B, the B-solve using the new A.
      With ``λ = 0`` this is block power iteration on ``T``: ``BA`` converges to the truncated SVD
      of ``T`` (Eckart–Young) at the rate ``(σ_{r+1}/σ_r)^{2k}``.

    Damping: with ``λ > 0`` both factors are pulled towards the init and every r×r system is
    positive definite (damped Cholesky). ``λ = 0`` is allowed and means the limit ``λ → 0⁺``: the
    least-squares solve on the range of the Gram, the init kept along its null space. Hence the
    LoRA start ``B0 = 0`` is legal for any ``λ``: the A-solve sees nothing and keeps ``A0``, the
    B-solve then projects ``T`` onto the row space of ``A0``.

    Stacks: with leading dims on ``B0``, every tensor (term factors, metrics, ``A0``) carries the
    same leading dims and the problems are solved at once, one batched product and one batched
    r×r factorisation per half-step (the weights are shared by the stack). This is how an
    optimizer steps many same-shape layers without a Python loop over them.

    Data parallelism: when the gradient terms are split over ranks (each holds the rows of its
    own batch, and the global target has ``(1/K) Σ_k`` of them, DDP's mean), pass their indices as
    ``local_terms`` and a ``reduce`` that averages a list of tensors over the ranks (for example
    :class:`lorsum.distributed.MeanReducer`). Every half-step then takes the products with the
    replicated terms (the anchor ``(B0, A0)``, a momentum) locally and averages only the local
    terms' share, ``Bᵀ M_out T_loc`` (``r × n``) or ``T_loc M_in Aᵀ`` (``m × r``), in one call for
    the whole stack (both shares in one call for ``num_iters = 0``). The metrics, the init and
    every replicated term must be equal on all ranks; the result then is too, and equals the fit
    of the global target. ``tol > 0`` stays consistent because the change it reads is replicated.

    Numerics: everything runs in ``compute_dtype`` (default: the promoted dtype of all inputs,
    at least float32); the outputs are cast once, ``B`` to the dtype of ``B0``, ``A`` to ``A0``'s.

    Args:
        terms: the summands of ``T``: pairs ``(P_i (m, k_i), Q_i (k_i, n))`` meaning ``P_i @ Q_i``,
            or dense ``(m, n)`` tensors. The gradient of a linear layer is the pair ``(Sᵀ, X)``
            with ``S (N, m)`` the output-gradients and ``X (N, n)`` the inputs.
        weights: one real scalar (or 0-d tensor) per term.
        init: ``(B0 (m, r), A0 (r, n))``, the starting point and proximal anchor.
        num_iters: number of alternating sweeps ``k >= 0`` (default: 1).
        damping: ``λ >= 0`` (default: 0.0).
        metric_out: ``M_out``, a positive ``(m,)`` vector (diagonal) or an ``(m, m)`` SPD matrix.
        metric_in: ``M_in``, a positive ``(n,)`` vector (diagonal) or an ``(n, n)`` SPD matrix.
        tol: stop after a sweep whose relative change ``max(‖ΔA‖/‖A‖, ‖ΔB‖/‖B‖)`` is below
            ``tol``; ``0`` (default) always runs ``num_iters`` sweeps and never reads a value back
            from the device.
        compute_dtype: dtype of all arithmetic; must be floating. Default: see Numerics.
        reduce: ``reduce(list_of_tensors) -> list_of_tensors``, the mean over ranks of each
            tensor (shapes kept); ``None`` (default): a single-process fit.
        local_terms: indices into ``terms`` of the rank-local terms (default: none). Needs
            ``reduce``; every other term is replicated.

    Returns:
        ``(B (m, r), A (r, n))`` in the dtypes of ``(B0, A0)``.

    Raises:
        ValueError: inconsistent shapes, ``len(terms) != len(weights)``, negative or non-finite
            ``damping`` or ``tol``, negative ``num_iters``, wrong metric shapes, mixed devices,
            ``local_terms`` out of range or repeated, or ``local_terms`` without ``reduce``.
        TypeError: non-tensor or non-floating inputs, a non-integer ``num_iters``.

    Example:
        >>> X, S = torch.randn(64, 20), torch.randn(64, 30)      # inputs, output-gradients
        >>> B0, A0 = torch.randn(30, 4), torch.randn(4, 20)
        >>> B, A = lorsum([(B0, A0), (S.T, X)], [1.0, -0.1], (B0, A0), num_iters=2, damping=1e-3)
        >>> B.shape, A.shape
        (torch.Size([30, 4]), torch.Size([4, 20]))

    Reference:
        LoRSum, arXiv:2602.16456; reference code github.com/zeligism/PSI-LoRA @ 9cb3fa6.

    .. note::
        Departures from the reference code: ``num_iters = 0`` returns the Jacobi step (the reference
        returns its input unchanged), ``λI`` is built in the compute dtype and no ``1e-6`` jitter is
        added to the Cholesky factorisation, and the metric target is passed in by the caller.
    """
    _check_options(num_iters=num_iters, damping=damping, tol=tol)
    problem = _Problem.build(
        terms, weights, init, damping, metric_out, metric_in, compute_dtype, reduce, local_terms
    )
    num_iters = int(num_iters)
    if num_iters == 0:
        return problem.cast_out(*_jacobi(problem))
    B, A = problem.B0, problem.A0
    for _ in range(num_iters):
        A_new = _update_A(problem, B)
        B_new = _update_B(problem, A_new)
        converged = tol > 0 and _relative_change(A_new, A, B_new, B) < tol
        B, A = B_new, A_new
        if converged:
            break
    return problem.cast_out(B, A)


def lorsum_iterates(
    terms: Sequence[Term],
    weights: Sequence[float | Tensor],
    init: tuple[Tensor, Tensor],
    *,
    num_iters: int = 1,
    damping: float = 0.0,
    metric_out: Tensor | None = None,
    metric_in: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(B, A)`` after every exact half-step of :func:`lorsum`.

    For ``num_iters = k >= 1`` it yields ``2k`` pairs: after the A-solve of each sweep (``B``
    unchanged) and after its B-solve; the last pair equals ``lorsum(...)`` with the same arguments.
    For ``num_iters = 0`` it yields the Jacobi pair once. Arguments, shapes and errors are those of
    :func:`lorsum`; the pairs come in the dtypes of ``(B0, A0)``. Use it to watch convergence (the
    objective after each half-step never increases) without re-running the earlier sweeps.
    """
    _check_options(num_iters=num_iters, damping=damping, tol=0.0)
    problem = _Problem.build(
        terms, weights, init, damping, metric_out, metric_in, compute_dtype, None, ()
    )
    if num_iters == 0:
        yield problem.cast_out(*_jacobi(problem))
        return
    B = problem.B0
    for _ in range(num_iters):
        A = _update_A(problem, B)
        yield problem.cast_out(B, A)
        B = _update_B(problem, A)
        yield problem.cast_out(B, A)


@dataclass(frozen=True)
class _Problem:
    """The validated inputs of one LoRSum call, in the compute dtype."""

    target: FactoredSum  # the replicated terms (all of them on one process)
    local: FactoredSum | None  # the rank-local terms, whose products are averaged by `reduce`
    reduce: Reduce | None
    B0: Tensor  # (m, r)
    A0: Tensor  # (r, n)
    damping: float
    metric_out: Tensor | None  # (m,) or (m, m)
    metric_in: Tensor | None  # (n,) or (n, n)
    b_dtype: torch.dtype
    a_dtype: torch.dtype

    @staticmethod
    def build(
        terms: Sequence[Term],
        weights: Sequence[float | Tensor],
        init: tuple[Tensor, Tensor],
        damping: float,
        metric_out: Tensor | None,
        metric_in: Tensor | None,
        compute_dtype: torch.dtype | None,
        reduce: Reduce | None,
        local_terms: Sequence[int],
    ) -> _Problem:
        if not isinstance(init, tuple | list) or len(init) != 2:
            raise TypeError(f"init must be a pair (B0, A0), got {type(init).__name__}")
        batch = _batch_of(init[0])
        B0 = _check_matrix("init[0] (B0)", init[0], batch)
        A0 = _check_matrix("init[1] (A0)", init[1], batch)
        (m, r), (r_a, n) = B0.shape[-2:], A0.shape[-2:]
        if r != r_a:
            raise ValueError(
                f"init factors disagree on the rank: B0 is {tuple(B0.shape)} and A0 is "
                f"{tuple(A0.shape)}; expected B0 (m, r) and A0 (r, n)"
            )
        if min(m, r, n) < 1:
            raise ValueError(f"empty factors: B0 {tuple(B0.shape)}, A0 {tuple(A0.shape)}")
        if A0.device != B0.device:
            raise ValueError(f"B0 is on {B0.device} but A0 is on {A0.device}")
        metrics = {"metric_out": (metric_out, m), "metric_in": (metric_in, n)}
        for name, (metric, size) in metrics.items():
            _check_metric(name, metric, size, B0.device, batch)
        if compute_dtype is None:
            given = [B0, A0, *(x for x, _ in metrics.values() if x is not None)]
            given += _term_tensors(terms)
            compute_dtype = default_compute_dtype(*given)
        elif not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
            raise TypeError(f"compute_dtype must be a floating torch.dtype, got {compute_dtype!r}")
        local = _check_local_terms(terms, weights, reduce, local_terms)
        place = {"dtype": compute_dtype, "device": B0.device, "batch": batch}
        local_sum = None
        if not local:
            target = FactoredSum.from_terms(terms, weights, (m, n), **place)
        else:
            shared = [i for i in range(len(terms)) if i not in local]
            target = FactoredSum.from_terms(
                [terms[i] for i in shared], [weights[i] for i in shared], (m, n), **place
            )
            local_sum = FactoredSum.from_terms(
                [terms[i] for i in local], [weights[i] for i in local], (m, n), **place
            )
        return _Problem(
            target=target,
            local=local_sum,
            reduce=reduce,
            B0=B0.to(compute_dtype),
            A0=A0.to(compute_dtype),
            damping=float(damping),
            metric_out=None if metric_out is None else metric_out.to(compute_dtype),
            metric_in=None if metric_in is None else metric_in.to(compute_dtype),
            b_dtype=B0.dtype,
            a_dtype=A0.dtype,
        )

    def cast_out(self, B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        return B.to(self.b_dtype), A.to(self.a_dtype)


def _update_A(problem: _Problem, B: Tensor) -> Tensor:
    """A-half-step: ``A = (BᵀM_out B + λI)⁻¹ (BᵀM_out T + λA0)``; ``B (m, r)`` → ``A (r, n)``."""
    MB = _metric_times(problem.metric_out, B)  # M_out B        (m, r)
    rhs = problem.target.rmatmul(MB)  # BᵀM_out T               (r, n)
    if problem.local is not None:
        rhs = rhs + problem.reduce([problem.local.rmatmul(MB)])[0]  # type: ignore[misc]
    return _solve_A(problem, B, MB, rhs)


def _update_B(problem: _Problem, A: Tensor) -> Tensor:
    """B-half-step: ``B = (T M_in Aᵀ + λB0)(A M_in Aᵀ + λI)⁻¹``; ``A (r, n)`` → ``B (m, r)``."""
    MAt = _metric_times(problem.metric_in, A.mT)  # M_in Aᵀ      (n, r)
    rhs = problem.target.matmul(MAt)  # T M_in Aᵀ                 (m, r)
    if problem.local is not None:
        rhs = rhs + problem.reduce([problem.local.matmul(MAt)])[0]  # type: ignore[misc]
    return _solve_B(problem, A, MAt, rhs)


def _jacobi(problem: _Problem) -> tuple[Tensor, Tensor]:
    """``num_iters = 0``: both half-steps from the init, their local shares in one reduction."""
    B0, A0 = problem.B0, problem.A0
    MB = _metric_times(problem.metric_out, B0)
    MAt = _metric_times(problem.metric_in, A0.mT)
    rhs_A, rhs_B = problem.target.rmatmul(MB), problem.target.matmul(MAt)
    if problem.local is not None:
        shares = problem.reduce([problem.local.rmatmul(MB), problem.local.matmul(MAt)])  # type: ignore[misc]
        rhs_A, rhs_B = rhs_A + shares[0], rhs_B + shares[1]
    return _solve_B(problem, A0, MAt, rhs_B), _solve_A(problem, B0, MB, rhs_A)


def _solve_A(problem: _Problem, B: Tensor, MB: Tensor, rhs: Tensor) -> Tensor:
    gram = B.mT @ MB  # BᵀM_out B                                 (r, r)
    return prox_solve(gram, rhs, problem.A0, problem.damping)


def _solve_B(problem: _Problem, A: Tensor, MAt: Tensor, rhs: Tensor) -> Tensor:
    gram = A @ MAt  # A M_in Aᵀ                                   (r, r)
    # Solved on the transposed system (A M_in Aᵀ + λI) Bᵀ = (T M_in Aᵀ + λB0)ᵀ.
    return prox_solve(gram, rhs.mT, problem.B0.mT, problem.damping).mT


def _check_local_terms(
    terms: Sequence[Term],
    weights: Sequence[float | Tensor],
    reduce: Reduce | None,
    local_terms: Sequence[int],
) -> list[int]:
    """``local_terms`` as a sorted list of valid, distinct term indices."""
    if reduce is not None and not callable(reduce):
        raise TypeError(f"reduce must be callable or None, got {type(reduce).__name__}")
    if isinstance(terms, Tensor) or not isinstance(terms, Sequence):
        return []  # FactoredSum.from_terms raises the precise error
    if isinstance(weights, Sequence) and len(weights) != len(terms):
        return []  # likewise
    local = list(local_terms)
    for index in local:
        if isinstance(index, bool) or not isinstance(index, Integral):
            raise TypeError(f"local_terms must hold term indices (ints), got {index!r}")
        if not 0 <= index < len(terms):
            raise ValueError(f"Invalid local_terms index {index} (there are {len(terms)} terms)")
    if len(set(local)) != len(local):
        raise ValueError(f"Invalid local_terms: {local_terms!r} (an index is repeated)")
    if local and reduce is None:
        raise ValueError(
            f"local_terms={local_terms!r} needs reduce: rank-local terms must be averaged over "
            "the ranks, or the fit would use this rank's share of the target only"
        )
    return sorted(int(i) for i in local)


def _metric_times(metric: Tensor | None, X: Tensor) -> Tensor:
    """``M @ X`` for a diagonal (vector) or dense (matrix) metric; identity when ``None``."""
    if metric is None:
        return X
    if metric.ndim < X.ndim:  # (…, d) against X (…, d, c): the diagonal of M
        return metric.unsqueeze(-1) * X
    return metric @ X


def _relative_change(A_new: Tensor, A: Tensor, B_new: Tensor, B: Tensor) -> float:
    tiny = torch.finfo(A.dtype).tiny
    change_A = torch.linalg.matrix_norm(A_new - A) / torch.linalg.matrix_norm(A).clamp_min(tiny)
    change_B = torch.linalg.matrix_norm(B_new - B) / torch.linalg.matrix_norm(B).clamp_min(tiny)
    return float(torch.maximum(change_A, change_B).max())  # the slowest problem of a stack


def _check_options(*, num_iters: object, damping: object, tol: object) -> None:
    if isinstance(num_iters, bool) or not isinstance(num_iters, Integral):
        raise TypeError(f"num_iters must be an int, got {num_iters!r}")
    if num_iters < 0:
        raise ValueError(f"Invalid num_iters: {num_iters} (must be >= 0)")
    for name, value in (("damping", damping), ("tol", tol)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"Invalid {name}: {value} (must be finite and >= 0)")


def _batch_of(B0: object) -> tuple[int, ...]:
    """The leading dims of a stacked init (``()`` for one problem); shapes are checked later."""
    return tuple(B0.shape[:-2]) if isinstance(B0, Tensor) and B0.ndim > 2 else ()


def _check_metric(
    name: str, metric: Tensor | None, size: int, device: torch.device, batch: tuple[int, ...]
) -> None:
    if metric is None:
        return
    if not isinstance(metric, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(metric).__name__}")
    if metric.is_complex() or not metric.is_floating_point():
        raise TypeError(f"{name} must have a real floating dtype, got {metric.dtype}")
    diagonal, dense = (*batch, size), (*batch, size, size)
    if tuple(metric.shape) not in (diagonal, dense):
        raise ValueError(
            f"{name} has shape {tuple(metric.shape)}; expected {diagonal} for a diagonal metric "
            f"or {dense} for a dense one"
        )
    if metric.device != device:
        raise ValueError(f"{name} is on {metric.device}, but the factors are on {device}")


def _term_tensors(terms: Sequence[Term]) -> list[Tensor]:
    """The tensors inside ``terms``, for dtype promotion (:class:`FactoredSum` validates them)."""
    if isinstance(terms, Tensor) or not isinstance(terms, Sequence):
        return []
    found: list[Tensor] = []
    for term in terms:
        parts = term if isinstance(term, tuple | list) else (term,)
        found += [t for t in parts if isinstance(t, Tensor) and t.is_floating_point()]
    return found
