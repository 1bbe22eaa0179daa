"""Data parallelism for the capture-based optimizers: which process group, and one mean reducer.

Under DDP every rank captures the rows ``(S_k, X_k)`` of its own micro-batches only, while DDP
averages ``.grad`` over the ranks. The global gradient is therefore the mean of the ranks' local
ones, ``G = (1/K) Σ_k S_kᵀ X_k``, and every product that LoRSum takes with ``G`` is linear in it:
``Bᵀ G = (1/K) Σ_k Bᵀ G_k`` (``r × n``) and ``G Aᵀ = (1/K) Σ_k G_k Aᵀ`` (``m × r``). Each rank
computes its share from its own rows and a :class:`MeanReducer` averages them, one collective per
half-step however many layers are stepped: activations are never gathered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["MeanReducer", "check_unsharded", "resolve_process_group"]

ProcessGroupArg = Any
"""``"auto"``, ``None`` or a ``torch.distributed.ProcessGroup``."""


def resolve_process_group(process_group: ProcessGroupArg) -> Any | None:
    """The process group to reduce over, or ``None`` for a single-process step.

    Args:
        process_group: ``"auto"``: the default group when ``torch.distributed`` is initialised
            with a world size above 1, else ``None``; ``None``: always local (each process steps
            from its own gradient, for runs that are not data parallel); or an explicit
            ``torch.distributed.ProcessGroup`` (a group of size 1 is local).

    Raises:
        TypeError: any other value.
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise TypeError(
                f"Invalid process_group: {process_group!r} (must be 'auto', None or a "
                "torch.distributed.ProcessGroup)"
            )
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        group = torch.distributed.group.WORLD
    else:
        if not (
            torch.distributed.is_available()
            and isinstance(process_group, torch.distributed.ProcessGroup)
        ):
            raise TypeError(
                f"Invalid process_group: {process_group!r} (must be 'auto', None or a "
                "torch.distributed.ProcessGroup)"
            )
        group = process_group
    return group if torch.distributed.get_world_size(group) > 1 else None


class MeanReducer:
    """Average lists of tensors over the ranks of a process group, one collective per call.

    The tensors are flattened into one buffer per dtype and device (one ``all_reduce`` (SUM) in
    the common case of a single compute dtype), divided by the world size and split back. The
    mean is DDP's convention for ``.grad``; callers that need a plain sum over ranks (counts, or
    statistics that are quadratic in the gradient) scale their inputs by the world size ``K``
    first (see :attr:`world_size`).

    Attributes:
        world_size: ``K``, the number of ranks in it.
        calls: collectives launched so far (one per dtype and device of each call).
        bytes_reduced: payload bytes this rank has sent into them so far (the tensors' own size,
            not the transport's), for measuring the communication volume.
    """

    def __init__(self, group: Any) -> None:
        # The default group is looked up at each call, not held. Optimizers often live in
        # reference cycles until the garbage collector runs, possibly at interpreter shutdown;
        # a reference from one would keep gloo's worker threads alive past
        # destroy_process_group(), and their teardown that late can abort the process.
        self._group = None if group is torch.distributed.group.WORLD else group
        self.world_size = torch.distributed.get_world_size(group)
        self.calls = 0
        self.bytes_reduced = 0

    @property
    def group(self) -> Any:
        """The process group (the current default group if it was given as the default)."""
        return torch.distributed.group.WORLD if self._group is None else self._group

    def __call__(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The mean over ranks of each tensor (new tensors of the same shapes and dtypes)."""
        tensors = list(tensors)
        buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for index, tensor in enumerate(tensors):
            buckets.setdefault((tensor.dtype, tensor.device), []).append(index)
        out: list[Tensor | None] = [None] * len(tensors)
        for indices in buckets.values():
            members = [tensors[i] for i in indices]
            flat = torch.cat([t.reshape(-1) for t in members])  # a copy: the inputs stay local
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=self._group)
            flat.div_(self.world_size)
            self.calls += 1
            self.bytes_reduced += flat.numel() * flat.element_size()
            for i, piece in zip(indices, flat.split([t.numel() for t in members]), strict=True):
                out[i] = piece.view(tensors[i].shape)
        return out  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"MeanReducer(world_size={self.world_size}, calls={self.calls}, "
            f"bytes_reduced={self.bytes_reduced})"
        )


def check_unsharded(name: str, *factors: Tensor) -> None:
    """Refuse LoRA factors that FSDP or DeepSpeed have sharded or flattened.

    A lorsum step needs each pair's whole ``A (r, n)`` and ``B (m, r)`` on every rank: its r×r
    Grams and solves are wrong on shards. FSDP2 (``fully_shard``) turns parameters into DTensors,
    FSDP1 and DeepSpeed ZeRO replace them by flat 1-D partitions (ZeRO-3 also tags them with
    ``ds_id``), and ZeRO-1/2 swap the optimizer's groups for flattened ones.

    Raises:
        NotImplementedError: one of those layouts; the message says to use DDP instead.
    """
    advice = (
        "lorsum steps whole LoRA factors (A (r, n), B (m, r)) on every rank; train with "
        "DistributedDataParallel (torchrun, accelerate's MULTI_GPU/MULTI_CPU, the Trainer without "
        "fsdp/deepspeed), whose averaging lorsum reproduces exactly (docs/distributed.md)"
    )
    if len(factors) != 2:
        raise NotImplementedError(
            f"LoRA group {name!r} holds {len(factors)} parameters instead of [A, B]: its group was "
            f"replaced by flattened partitions (DeepSpeed ZeRO or FSDP1 flat parameters). {advice}"
        )
    for factor in factors:
        if _is_dtensor(factor):
            raise NotImplementedError(
                f"LoRA group {name!r} has a DTensor factor of shape {tuple(factor.shape)} "
                f"(FSDP2 fully_shard or tensor parallelism). {advice}"
            )
        if hasattr(factor, "ds_id"):
            raise NotImplementedError(
                f"LoRA group {name!r} has a DeepSpeed ZeRO-partitioned factor (ds_id="
                f"{factor.ds_id!r}). {advice}"
            )
        if factor.ndim != 2:
            raise NotImplementedError(
                f"LoRA group {name!r} has a factor of shape {tuple(factor.shape)}, not a matrix: "
                f"flattened by FSDP1 or DeepSpeed ZeRO? {advice}"
            )


def _is_dtensor(tensor: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
