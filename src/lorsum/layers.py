"""lorsum's own LoRA layer, for models without PEFT: ``y = W0 x + s · B A dropout(x)``.

It mirrors PEFT's layout (``lora_A`` and ``lora_B`` are bias-free ``nn.Linear`` sub-modules,
``B = 0`` at init, ``s = alpha / r`` or ``alpha / √r``), so the gradient capture and every
optimizer treat both the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from lorsum._modules import replace_module, select_linears
from lorsum.lora import LoRAPair

__all__ = ["LoRALinear", "add_lora", "lora_pairs"]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``scaling · B @ A``.

    Args:
        base: the linear layer to adapt; its parameters are frozen (``requires_grad=False``).
        rank: ``r >= 1``.
        alpha: the LoRA alpha (default: ``rank``, so ``scaling = 1``).
        dropout: dropout on the adapter's input (default: 0).
        use_rslora: ``scaling = alpha / √r`` instead of ``alpha / r``.
        name: the layer's name in its model (for messages and param groups).

    ``A`` starts Kaiming-uniform (as PEFT's ``lora_A``) and ``B`` at zero, so the layer starts as
    ``base`` exactly.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        name: str = "",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear adapts nn.Linear layers, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Invalid rank: {rank!r} (must be an int >= 1)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Invalid dropout: {dropout} (must satisfy 0 <= dropout < 1)")
        alpha = float(rank if alpha is None else alpha)
        if not alpha > 0:
            raise ValueError(f"Invalid alpha: {alpha} (must be > 0)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @property
    def pair(self) -> LoRAPair:
        """This layer's adapter as a :class:`LoRAPair`, with the modules the capture hooks."""
        return LoRAPair(
            A=self.lora_A.weight,
            B=self.lora_B.weight,
            scaling=self.scaling,
            name=self.name,
            modules=(self.lora_A, self.lora_B),
        )

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """``W0 + s · B @ A`` as a dense tensor (for inspection and tests)."""
        return self.base.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.out_features}, scaling={self.scaling:g}"


def add_lora(
    model: nn.Module,
    target: Iterable[str] | Callable[[str, nn.Linear], bool],
    rank: int,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[LoRAPair]:
    """Replace chosen ``nn.Linear`` sub-modules of ``model`` by :class:`LoRALinear`, in place.

    Args:
        model: the model to adapt (modified in place, like PEFT's ``get_peft_model``).
        target: the module names to adapt, exactly as ``model.named_modules()`` spells them, or a
            predicate ``(name, linear) -> bool``.
        rank, alpha, dropout, use_rslora: as :class:`LoRALinear`.

    Returns:
        The new adapters' pairs, in ``named_modules`` order.

    Raises:
        ValueError: a named target that does not exist or is not an ``nn.Linear``, or no match.
    """
    pairs = []
    for name, linear in select_linears(model, target, "add_lora"):
        layer = LoRALinear(
            linear, rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, name=name
        )
        replace_module(model, name, layer)
        pairs.append(layer.pair)
    return pairs


def lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """The pairs of every :class:`LoRALinear` in ``model``, in ``named_modules`` order.

    Raises:
        ValueError: the model has no ``LoRALinear`` layer.
    """
    pairs = [
        dataclasses.replace(m.pair, name=m.name or name)
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear)
    ]
    if not pairs:
        raise ValueError("the model has no LoRALinear layers; add them with lorsum.add_lora")
    return pairs
