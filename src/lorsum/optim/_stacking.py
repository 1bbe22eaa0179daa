"""Stacks: LoRA pairs of equal shapes, dtypes and hyperparameters stepped as one batch.

A model has many same-shape adapters (every layer's q, k, v, ...). Stepping them one by one is a
Python loop of small kernels (r×r solves, thin products), each too small to fill a GPU; stacking
them makes one batched kernel per operation. These helpers build the stacks; each optimizer
decides what goes in its key and how large a stack may be.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lorsum.capture import CapturedGradient

__all__ = [
    "STACK_LIMIT",
    "Alone",
    "captured_numel",
    "captured_stack_key",
    "group_stacks",
    "hyperparameter_key",
    "split_by_size",
    "stack",
    "stack_terms",
]

Item = TypeVar("Item")

# A pair whose captured gradient holds more numbers than this is stepped alone even with
# foreach=True: its products already keep the device busy, and stacking would copy the rows
# (time, and memory as large as the rows themselves). 2**22 floats: 16 MiB in float32.
STACK_LIMIT = 2**22


@dataclass(frozen=True)
class Alone:
    """The stack key of a pair stepped on its own (``foreach=False``, a gradient over
    ``STACK_LIMIT``, or an optimizer that steps pair by pair): no other pair shares it, so a
    backward bucket (``backward_bucket``) has no reason to hold it back."""

    pair: int  # id() of the pair's B


def stack(tensors: list[Tensor]) -> Tensor:
    """``(G, …)`` from ``G`` same-shape tensors; a view, not a copy, when ``G = 1``.

    Transposed views (the captured ``Sᵀ``) are stacked untransposed and transposed back: a
    strided transposing copy of ``N × m`` rows costs several times a contiguous one.
    """
    if len(tensors) == 1:
        return tensors[0].unsqueeze(0)
    if all(t.ndim == 2 and not t.is_contiguous() and t.mT.is_contiguous() for t in tensors):
        return torch.stack([t.mT for t in tensors]).mT
    return torch.stack(tensors)


def stack_terms(per_pair: list[list[Any]]) -> list[Any]:
    """Term ``j`` of every pair, stacked: ``[(P_j (G, m, k), Q_j (G, k, n)) or D_j (G, m, n)]``."""
    stacked: list[Any] = []
    for term in zip(*per_pair, strict=True):
        if isinstance(term[0], tuple):
            stacked.append((stack([P for P, _ in term]), stack([Q for _, Q in term])))
        else:
            stacked.append(stack(list(term)))
    return stacked


def captured_numel(captured: CapturedGradient) -> int:
    """How many numbers a captured gradient holds (its rows, or its dense ``m × n``)."""
    return sum(
        t.numel()
        for term in captured.terms()
        for t in (term if isinstance(term, tuple) else (term,))
    )


def captured_stack_key(
    group: dict[str, Any], A: Tensor, B: Tensor, captured: CapturedGradient
) -> Hashable:
    """The stack key of a pair stepped from its captured gradient: pairs with equal keys agree
    on their factors' shapes, dtypes and device, on the layout of their captured terms (rows or
    dense, and their shapes) and on every hyperparameter, so their terms stack term by term."""
    layout = tuple(
        (tuple(t[0].shape), tuple(t[1].shape), t[0].dtype, t[1].dtype)
        if isinstance(t, tuple)
        else (tuple(t.shape), t.dtype)
        for t in captured.terms()
    )
    return (
        (tuple(A.shape), tuple(B.shape), A.dtype, B.dtype, A.device),
        (layout, captured.averaged),
        hyperparameter_key(group),
    )


def hyperparameter_key(group: dict[str, Any]) -> tuple[Any, ...]:
    """A param group's hyperparameters as a hashable key (its params and name left out)."""
    return tuple((k, _hashable(v)) for k, v in sorted(group.items()) if k not in ("params", "name"))


def group_stacks(items: Iterable[Item], key: Callable[[Item], Hashable | None]) -> list[list[Item]]:
    """``items`` gathered by ``key`` into stacks, in first-seen order.

    An item whose key is ``None`` is left out (a pair with nothing to step); an :class:`Alone`
    key steps it alone.
    """
    stacks: dict[Hashable, list[Item]] = {}
    for item in items:
        k = key(item)
        if k is not None:
            stacks.setdefault(k, []).append(item)
    return list(stacks.values())


def split_by_size(
    members: Iterable[Item], numel: Callable[[Item], int], limit: int
) -> list[list[Item]]:
    """Consecutive chunks of ``members`` whose summed ``numel`` stays within ``limit``.

    A member larger than ``limit`` is a chunk of its own: for the optimizers whose stacked
    work holds full-size (m×n) buffers, this bounds the extra memory stacking costs.
    """
    chunks: list[list[Item]] = []
    size = 0
    for item in members:
        n = numel(item)
        if not chunks or size + n > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return chunks


def _hashable(value: Any) -> Hashable:
    """A group value as part of a key: lists as tuples; tensors (scheduled rates) by identity."""
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value
