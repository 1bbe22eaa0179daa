"""The cost model of one optimizer step: floating-point operations and bytes moved, per method.

Counts are for one LoRA layer ``W0 + B A`` with ``B (m, r)``, ``A (r, n)``, after a backward over
``N`` rows, float32 (``b = 4`` bytes a number), to leading order; ``r ≪ m, n`` terms of order
``r²(m + n)`` are kept because at small ``N`` they are not negligible. A multiply-add is two
operations. What the capture holds decides LoRSum's cost: rows ``(S, X)`` while
``N (m + n) <= m n`` (the default fold policy), else a dense ``m × n`` gradient.

* **AdamW-LoRA**: elementwise on the ``r (m + n)`` factor entries; about 12 operations each, and
  7 numbers moved (read parameter, gradient and two moments, write three).
* **PrecondLoRA**: two ``r × r`` Grams (``2 r² (m + n)``), two ``r × r`` solves against the
  factor gradients (``2 r² (m + n)``), the base step on top (SGD or AdamW).
* **LoRSum, k sweeps** (``k = 0`` is the Jacobi pass, as costly as one sweep): each half-step
  multiplies the target ``T = B0 A0 − η G`` by ``r`` columns. On rows that is ``2 N r (m + n)``
  (``Sᵀ(X Aᵀ)`` or ``(B ᵀSᵀ) X``), plus ``4 r² (m + n)`` for the ``B0 A0`` term, the Gram and the
  solve's right-hand side; on a dense ``G`` it is ``2 r m n``. Bytes: the gradient is read once
  per half-step. Momentum fits a second factorisation of the same size: twice the cost.
* **ScaledLoRSum, diagonal**: LoRSum's one sweep with its momentum (twice), plus scaling the
  gradient by the metric powers (``N (m + n)`` or ``m n`` operations, one more pass over it).
* **ScaledLoRSum, dense**: adds two symmetric eigendecompositions for the metric powers
  (``≈ 9 (m³ + n³)``, the vendor-neutral estimate for eigenvalues with vectors) and the dense
  preconditioned gradient ``2 m n (m + n)``.
* **LoRA-Pro**: the equivalent gradient and its projection go through ``m × n`` products with
  the factors (``≈ 8 r m n``), and AdamW on ``m × n`` full-size moments (``12 m n``; ``7 m n``
  numbers moved).
* **SVDLoRA**: forms the ``m × n`` step (``2 r m n``, plus ``2 N m n`` from rows) and takes a thin
  SVD with both singular bases, ``≈ 4 m² n + 8 m n² + 9 n³`` for ``m >= n`` (Golub and Van Loan,
  *Matrix Computations*, 4th ed., §8.6), swapped for ``m < n``.

The floor of a step is ``max(flops / F, bytes / W)`` with ``F`` the device's measured
matrix-product rate and ``W`` its copy bandwidth (the ``ceilings`` part of the step-cost suite);
the measured fraction is the floor over the measured time. Small steps are far from their floor
(launch and Python overheads dominate), which the fraction shows plainly.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepCost", "gradient_is_rows", "step_cost"]

BYTES = 4  # float32


@dataclass(frozen=True)
class StepCost:
    """Operations and bytes of one step of one layer."""

    flops: float
    bytes: float

    def __add__(self, other: StepCost) -> StepCost:
        return StepCost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, factor: float) -> StepCost:
        return StepCost(self.flops * factor, self.bytes * factor)

    def floor_s(self, flops_per_s: float, bytes_per_s: float) -> float:
        """The time no implementation beats on a device with these two ceilings."""
        return max(self.flops / flops_per_s, self.bytes / bytes_per_s)


def gradient_is_rows(m: int, n: int, N: int) -> bool:
    """Whether the capture keeps ``N`` rows (``True``) or folds them into ``m × n`` (default)."""
    return N * (m + n) <= m * n


def step_cost(method: str, m: int, n: int, r: int, N: int, *, rows: bool | None = None) -> StepCost:
    """The model cost of ``method``'s step on one layer (names as in the step-cost suite).

    Args:
        method: ``adamw``, ``precond-sgd``, ``precond-adamw``, ``lorsum-x<k>`` (optionally
            ``-momentum``), ``scaled-diagonal``, ``scaled-dense``, ``lora-pro``, ``svdlora`` or
            ``svdlora-gram`` (its float64 arithmetic counted as float32's: the model has one
            rate).
        m, n, r, N: layer shape, rank and rows of the backward.
        rows: the captured gradient's form (default: the capture's fold policy).

    Raises:
        ValueError: an unknown method.
    """
    rows = gradient_is_rows(m, n, N) if rows is None else rows
    factors = r * (m + n)
    adamw = StepCost(12 * factors, 7 * factors * BYTES)
    if method == "adamw":
        return adamw
    if method in ("precond-sgd", "precond-adamw"):
        precondition = StepCost(4 * r * factors, 4 * factors * BYTES)
        base = adamw if method == "precond-adamw" else StepCost(2 * factors, 3 * factors * BYTES)
        return precondition + base
    if method.startswith("lorsum-x"):
        name = method.removeprefix("lorsum-x")
        sweeps_text, _, suffix = name.partition("-")
        if not sweeps_text.isdigit() or suffix not in ("", "momentum"):
            raise ValueError(f"unknown LoRSum variant {method!r}")
        fits = 2 if suffix == "momentum" else 1
        return _lorsum_sweep(m, n, r, N, rows) * (max(int(sweeps_text), 1) * fits)
    if method in ("scaled-diagonal", "scaled-dense"):
        gradient = N * (m + n) if rows else m * n
        cost = _lorsum_sweep(m, n, r, N, rows) * 2 + StepCost(gradient, 2 * gradient * BYTES)
        if method == "scaled-dense":
            cost += StepCost(9 * (m**3 + n**3) + 2 * m * n * (m + n), 4 * (m * m + n * n) * BYTES)
        return cost
    if method == "lora-pro":
        return adamw + StepCost(8 * r * m * n + 12 * m * n, 7 * m * n * BYTES)
    if method in ("svdlora", "svdlora-gram"):
        big, small = max(m, n), min(m, n)
        form = 2 * r * m * n + (2 * N * m * n if rows else m * n)
        if method == "svdlora":
            decompose = 4 * big * big * small + 8 * big * small * small + 9 * small**3
        else:  # the smaller Gram matrix, its eigendecomposition, the other side's r vectors
            decompose = 2 * big * small * small + 9 * small**3 + 2 * r * m * n
        return StepCost(form + decompose, 6 * m * n * BYTES)
    raise ValueError(f"unknown method {method!r}")


def _lorsum_sweep(m: int, n: int, r: int, N: int, rows: bool) -> StepCost:
    """One alternating sweep (two half-steps) of LoRSum's fit on one layer."""
    small = 8 * r * r * (m + n)  # the B0 A0 term, Grams and solves' right-hand sides
    if rows:
        return StepCost(4 * N * r * (m + n) + small, 2 * N * (m + n) * BYTES)
    return StepCost(4 * r * m * n + small, 2 * m * n * BYTES)
