"""LoRA+ and plain LoRA baselines: torch's own optimizers with explicit per-pair groups."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from lorsum.lora import LoRAPair

__all__ = ["lora_plus_param_groups"]


def lora_plus_param_groups(
    pairs: Sequence[LoRAPair],
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    weight_decay: float = 0.0,
    dense_params: Sequence[nn.Parameter] = (),
    dense_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Param groups for LoRA+: ``A`` at ``lr``, ``B`` at ``loraplus_lr_ratio · lr``.

    Pass them to any ``torch.optim`` optimizer (``torch.optim.AdamW(groups)`` is the paper's
    setting). Every group is explicit and non-empty: one group of all ``A`` factors, one of all
    ``B`` factors, and one of the dense parameters (heads, biases) at ``dense_lr`` if any are
    given (default: ``lr``). Unlike PEFT's factory, biases and other 1-d parameters never land
    in the ``B`` group by accident: only the pairs' ``B`` factors do. ``loraplus_lr_ratio = 1``
    gives plain LoRA with the base optimizer.

    Args:
        pairs: the adapters.
        lr: ``η_A``.
        loraplus_lr_ratio: ``λ = η_B / η_A >= 1`` in the paper (default: 16, its practical value).
        weight_decay: the groups' weight decay (default: 0).
        dense_params: the other trainable parameters.
        dense_lr: their learning rate (default: ``lr``).

    Reference:
        Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
        arXiv:2402.12354.
    """
    if not pairs:
        raise ValueError("no LoRA pairs given: the model has no adapter layers to optimize")
    if not (math.isfinite(loraplus_lr_ratio) and loraplus_lr_ratio > 0):
        raise ValueError(f"Invalid loraplus_lr_ratio: {loraplus_lr_ratio} (must be > 0)")
    groups: list[dict[str, Any]] = [
        {"params": [p.A for p in pairs], "lr": lr, "weight_decay": weight_decay, "name": "lora_A"},
        {
            "params": [p.B for p in pairs],
            "lr": lr * loraplus_lr_ratio,
            "weight_decay": weight_decay,
            "name": "lora_B",
        },
    ]
    if dense_params:
        groups.append(
            {
                "params": list(dense_params),
                "lr": lr if dense_lr is None else dense_lr,
                "weight_decay": weight_decay,
                "name": "dense",
            }
        )
    return groups
