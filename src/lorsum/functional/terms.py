"""A weighted sum of matrices kept in factored form: the target that LoRSum fits.

``T = Σ_i w_i · P_i @ Q_i`` (pairs) ``+ Σ_j w_j · D_j`` (dense terms). Pairs are never multiplied
out: every product with ``T`` contracts through the inner size ``k_i`` first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor

__all__ = ["FactoredSum", "Term"]

Term = Tensor | tuple[Tensor, Tensor]
"""A pair ``(P (m, k), Q (k, n))`` meaning ``P @ Q``, or a dense ``(m, n)`` tensor."""


def _check_weight(index: int, weight: object) -> float | Tensor:
    if isinstance(weight, Tensor):
        if weight.ndim != 0 or weight.is_complex() or not weight.is_floating_point():
            raise TypeError(
                f"weights[{index}] must be a real number or a 0-d floating tensor, "
                f"got a tensor of shape {tuple(weight.shape)} and dtype {weight.dtype}"
            )
        return weight
    if isinstance(weight, bool) or not isinstance(weight, Real):
        raise TypeError(f"weights[{index}] must be a real number, got {weight!r}")
    if not math.isfinite(weight):
        raise ValueError(f"weights[{index}] must be finite, got {weight!r}")
    return float(weight)


def _check_matrix(name: str, x: object, batch: tuple[int, ...] = ()) -> Tensor:
    """``x`` as a real floating matrix, or a stack of them with leading dims ``batch``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 + len(batch) or tuple(x.shape[:-2]) != batch:
        expected = (
            "a matrix (2-d)" if not batch else f"a stack of matrices of shape {batch} + (·, ·)"
        )
        raise ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)}")
    if x.is_complex() or not x.is_floating_point():
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
    if x.layout != torch.strided:
        raise NotImplementedError(f"{name} has layout {x.layout}; only dense tensors are supported")
    return x


@dataclass(frozen=True)
class FactoredSum:
    """``T = Σ_i w_i P_i Q_i + Σ_j w_j D_j`` of shape ``(m, n)``, never formed densely.

    Build it with :meth:`from_terms`, which validates shapes. The products :meth:`matmul`
    (``T @ Z``) and :meth:`rmatmul` (``Yᵀ @ T``) cost ``O(k_i · c · (m + n))`` per pair for ``c``
    columns, so a rank-``c`` probe of ``T`` never allocates anything of size ``m × n`` unless a
    dense term was given.

    Attributes:
        pairs: ``(w_i, P_i (m, k_i), Q_i (k_i, n))`` triples.
        dense: ``(w_j, D_j (m, n))`` pairs.
        shape: ``(m, n)``.
    """

    pairs: tuple[tuple[float | Tensor, Tensor, Tensor], ...]
    dense: tuple[tuple[float | Tensor, Tensor], ...]
    shape: tuple[int, int]
    batch: tuple[int, ...] = ()

    @staticmethod
    def from_terms(
        terms: Sequence[Term],
        weights: Sequence[float | Tensor],
        shape: tuple[int, int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        batch: tuple[int, ...] = (),
    ) -> FactoredSum:
        """Validate ``terms`` against ``shape = (m, n)`` and cast them to ``dtype``/``device``.

        Args:
            terms: each a pair ``(P (m, k), Q (k, n))`` or a dense ``(m, n)`` tensor, every one
                with the leading dims ``batch`` when a stack of sums is represented.
            weights: one real scalar (or 0-d tensor) per term, shared by the stack.
            shape: ``(m, n)`` of the represented matrix.
            dtype: cast every factor to this dtype (no copy when it already matches).
            device: the device every term must already be on (no silent transfers).
            batch: leading dims of a stack of sums (default ``()``: one sum).

        Raises:
            ValueError: ``len(terms) != len(weights)``, a shape that does not fit ``(m, n)``, a
                non-finite weight, or a term on another device.
            TypeError: a term that is not a tensor or pair of tensors, or not real floating.
        """
        if isinstance(terms, Tensor) or not isinstance(terms, Sequence):
            raise TypeError(
                "terms must be a sequence of (P, Q) pairs or dense tensors, "
                f"got {type(terms).__name__}"
            )
        if isinstance(weights, Tensor) or not isinstance(weights, Sequence):
            raise TypeError(f"weights must be a sequence of scalars, got {type(weights).__name__}")
        if len(terms) != len(weights):
            raise ValueError(
                f"len(terms) = {len(terms)} but len(weights) = {len(weights)}; "
                "give exactly one weight per term"
            )
        m, n = shape
        pairs: list[tuple[float | Tensor, Tensor, Tensor]] = []
        dense: list[tuple[float | Tensor, Tensor]] = []
        for i, (term, weight) in enumerate(zip(terms, weights, strict=True)):
            w = _check_weight(i, weight)
            if isinstance(term, Tensor):
                D = _check_matrix(f"terms[{i}]", term, batch)
                if tuple(D.shape[-2:]) != (m, n):
                    raise ValueError(
                        f"dense terms[{i}] has shape {tuple(D.shape)}, expected {(*batch, m, n)}"
                    )
                dense.append((w, _place(f"terms[{i}]", D, dtype, device)))
            elif isinstance(term, tuple | list) and len(term) == 2:
                P = _check_matrix(f"terms[{i}][0] (left factor)", term[0], batch)
                Q = _check_matrix(f"terms[{i}][1] (right factor)", term[1], batch)
                if P.shape[-2] != m or Q.shape[-1] != n or P.shape[-1] != Q.shape[-2]:
                    raise ValueError(
                        f"terms[{i}] = (P {tuple(P.shape)}, Q {tuple(Q.shape)}) does not form an "
                        f"({m}, {n}) product: P must be ({m}, k) and Q (k, {n})"
                    )
                pairs.append(
                    (
                        w,
                        _place(f"terms[{i}][0]", P, dtype, device),
                        _place(f"terms[{i}][1]", Q, dtype, device),
                    )
                )
            else:
                raise TypeError(
                    f"terms[{i}] must be a (P, Q) pair or a dense tensor, got {type(term).__name__}"
                )
        return FactoredSum(tuple(pairs), tuple(dense), (m, n), tuple(batch))

    def matmul(self, Z: Tensor) -> Tensor:
        """``T @ Z`` for ``Z (…, n, c)``; returns ``(…, m, c)``. Costs ``Σ_i k_i c (m + n)``."""
        out = Z.new_zeros(*self.batch, self.shape[0], Z.shape[-1])
        for w, P, Q in self.pairs:
            # (Q Z) is k×c: contract through the small inner size before touching m.
            _add_product_(out, P, (Q @ Z).mul_(w))
        for w, D in self.dense:
            out.add_((D @ Z).mul_(w))
        return out

    def rmatmul(self, Y: Tensor) -> Tensor:
        """``Yᵀ @ T`` for ``Y (…, m, c)``; returns ``(…, c, n)``. Costs ``Σ_i k_i c (m + n)``."""
        out = Y.new_zeros(*self.batch, Y.shape[-1], self.shape[1])
        Yt = Y.mT
        for w, P, Q in self.pairs:
            _add_product_(out, (Yt @ P).mul_(w), Q)
        for w, D in self.dense:
            out.add_((Yt @ D).mul_(w))
        return out

    def to(self, dtype: torch.dtype) -> FactoredSum:
        """The same sum with every factor cast to ``dtype`` (weights unchanged)."""
        return FactoredSum(
            tuple((w, P.to(dtype), Q.to(dtype)) for w, P, Q in self.pairs),
            tuple((w, D.to(dtype)) for w, D in self.dense),
            self.shape,
            self.batch,
        )

    def to_dense(self) -> Tensor:
        """``T`` as an ``(m, n)`` tensor. For oracles and dense baselines only."""
        factors = [P for _, P, _ in self.pairs] + [D for _, D in self.dense]
        if not factors:
            raise ValueError("an empty sum has no dtype or device; give at least one term")
        out = factors[0].new_zeros(*self.batch, *self.shape)
        for w, P, Q in self.pairs:
            out.add_((P @ Q).mul_(w))
        for w, D in self.dense:
            out.add_(D * w)
        return out


def _add_product_(out: Tensor, left: Tensor, right: Tensor) -> None:
    """``out += left @ right`` in one fused kernel for matrices and stacks of matrices."""
    if out.ndim == 2:
        out.addmm_(left, right)
    elif out.ndim == 3:
        out.baddbmm_(left, right)
    else:
        out.add_(left @ right)


def _place(name: str, x: Tensor, dtype: torch.dtype | None, device: torch.device | None) -> Tensor:
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, but the factors are on {device}")
    return x if dtype is None else x.to(dtype)
