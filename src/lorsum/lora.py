"""Explicit LoRA pairs: ``W = W0 + s · B @ A`` as a value, and the param groups built from them.

A pair is never inferred from parameter names or order: integrations find the adapter layers
by type and return :class:`LoRAPair` values, and every optimizer gets one param group per pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = ["LoRAPair", "dense_param_group", "dense_parameters", "pair_param_groups"]


@dataclass(frozen=True, eq=False)
class LoRAPair:
    """One low-rank adapter ``W = W0 + scaling · B @ A``.

    Attributes:
        A: the down factor ``(r, n)`` (PEFT's ``lora_A.weight``), applied first.
        B: the up factor ``(m, r)`` (PEFT's ``lora_B.weight``).
        scaling: ``s`` (``alpha / r``, or ``alpha / √r`` with rsLoRA), ``> 0``.
        name: a readable name for messages and param groups (e.g. the module path).
        modules: ``(down, up)``, the modules whose forward applies ``A`` and then ``B``. Needed
            only to capture the full gradient (:class:`lorsum.GradientCapture`): the input of
            ``down`` is the (dropped-out) layer input and the output-gradient of ``up`` already
            carries the scaling, exactly as autograd sees them.

    Raises:
        ValueError: factors that are not 2-d, disagree on the rank, or a non-positive scaling.
    """

    A: nn.Parameter
    B: nn.Parameter
    scaling: float = 1.0
    name: str = ""
    modules: tuple[nn.Module, nn.Module] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for label, factor in (("A", self.A), ("B", self.B)):
            if not isinstance(factor, nn.Parameter) and not getattr(factor, "requires_grad", False):
                raise TypeError(f"LoRA pair {self.name!r}: {label} must be a trainable parameter")
            if factor.ndim != 2:
                raise ValueError(
                    f"LoRA pair {self.name!r}: {label} must be 2-d, got shape {tuple(factor.shape)}"
                )
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"LoRA pair {self.name!r}: A {tuple(self.A.shape)} and B {tuple(self.B.shape)} "
                "disagree on the rank; expected A (r, n) and B (m, r)"
            )
        if not (isinstance(self.scaling, int | float) and math.isfinite(self.scaling)):
            raise ValueError(f"LoRA pair {self.name!r}: invalid scaling {self.scaling!r}")
        if self.scaling <= 0:
            raise ValueError(f"LoRA pair {self.name!r}: scaling must be > 0, got {self.scaling}")
        if self.modules is not None and len(self.modules) != 2:
            raise ValueError(f"LoRA pair {self.name!r}: modules must be (down, up)")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the adapted weight."""
        return self.B.shape[0], self.A.shape[1]


def pair_param_groups(pairs: Sequence[LoRAPair], **hyperparameters: Any) -> list[dict[str, Any]]:
    """One param group per pair: ``{"params": [A, B], "kind": "lora", "lora_scaling": s, "name"}``.

    Extra keyword arguments (``lr``, ``damping``, ...) are copied into every group, where LR
    schedulers and ``state_dict`` already handle them.

    Raises:
        ValueError: no pairs, or a parameter that appears in two pairs.
    """
    if not pairs:
        raise ValueError("no LoRA pairs given: the model has no adapter layers to optimize")
    seen: dict[int, str] = {}
    groups = []
    for pair in pairs:
        if not isinstance(pair, LoRAPair):
            raise TypeError(f"expected LoRAPair values, got {type(pair).__name__}")
        for factor in (pair.A, pair.B):
            if id(factor) in seen:
                raise ValueError(
                    f"a parameter of LoRA pair {pair.name!r} also belongs to {seen[id(factor)]!r}"
                )
            seen[id(factor)] = pair.name
        groups.append(
            {
                "params": [pair.A, pair.B],
                "kind": "lora",
                "lora_scaling": float(pair.scaling),
                "name": pair.name,
                **hyperparameters,
            }
        )
    return groups


def dense_param_group(params: Iterable[nn.Parameter], **hyperparameters: Any) -> dict[str, Any]:
    """A group of non-LoRA trainable parameters (heads, biases, ``modules_to_save``).

    LoRA optimizers update these with AdamW (``dense_optimizer="adamw"``, the default) or SGD.
    """
    return {"params": list(params), "kind": "dense", **hyperparameters}


def dense_parameters(model: nn.Module, pairs: Sequence[LoRAPair]) -> list[nn.Parameter]:
    """Every trainable parameter of ``model`` that is not a factor of one of ``pairs``.

    These are the parameters a lorsum optimizer steps in its dense groups (AdamW or SGD):
    ``modules_to_save`` heads, biases (``bias="lora_only"``/``"all"``, ``lora_bias=True``), and
    the LoRA factors of any other adapter left trainable. Membership is by identity, never by name.

    Args:
        model: the model.
        pairs: the LoRA pairs that the LoRA groups hold.

    Returns:
        The parameters with ``requires_grad=True``, in ``model.parameters()`` order, each once.
    """
    in_pairs = {id(factor) for pair in pairs for factor in (pair.A, pair.B)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
