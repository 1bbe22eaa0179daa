"""What the fine-tuning tasks (``glue``, ``squad``, ``lm``) share: the methods and their optimizers.

Every method trains the same PEFT LoRA adapters on a pretrained model; only the optimizer of the
adapters differs. Parameters outside the adapters (a new classification or span head) are
stepped by one AdamW at ``HEAD_LR`` for every method, so that the head never decides a
comparison. ``full-adamw`` is the upper reference: no adapters, AdamW on every weight.

Settings common to all methods, stated once: constant learning rate (the reference's tuning
runs use constant rates), no gradient clipping, no weight decay, LoRA dropout 0.1 with
``lora_alpha = r`` (scaling 1), as in the paper's GLUE runs (spec ``lorsum.md`` §6.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import lorsum
from lorsum.integrations import peft as lorsum_peft

HEAD_LR = 1e-3
LORA_DROPOUT = 0.1
SGD_MOMENTUM = 0.9

# method -> (create_optimizer name, or "full" for full fine-tuning; hyperparameters without lr)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "full-adamw": ("full", {}),
    "lora-sgd": ("sgd", {"momentum": SGD_MOMENTUM}),
    "lora-adamw": ("adamw", {}),
    "loraplus": ("loraplus", {"loraplus_lr_ratio": 16.0}),
    "precond-sgd": ("precond_sgd", {"damping": 1e-3, "momentum": SGD_MOMENTUM}),
    "precond-adamw": ("precond_adamw", {"damping": 1e-3}),
    "svdlora": ("svdlora", {"momentum": SGD_MOMENTUM}),
    "lora-pro": ("lora_pro", {}),
    "lorsum-x1-nomom": ("lorsum", {"num_iters": 1, "damping": 1e-3}),
    "lorsum-x1": ("lorsum", {"num_iters": 1, "damping": 1e-3, "momentum": SGD_MOMENTUM}),
    "lorsum-x2": ("lorsum", {"num_iters": 2, "damping": 1e-3, "momentum": SGD_MOMENTUM}),
    "lorsum-x8": ("lorsum", {"num_iters": 8, "damping": 1e-3, "momentum": SGD_MOMENTUM}),
    "scaled-kfac": ("scaled_lorsum", {"metric": "kfac", "betas": (0.9, 0.99)}),
    "scaled-shampoo": ("scaled_lorsum", {"metric": "shampoo", "betas": (0.9, 0.99)}),
}


def add_adapters(
    model: nn.Module, target_modules: Sequence[str], rank: int, *,
    modules_to_save: Sequence[str] = (),
) -> nn.Module:  # fmt: skip
    """``model`` with PEFT LoRA adapters (``lora_alpha = rank``, dropout ``LORA_DROPOUT``)."""
    import peft

    config = peft.LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=LORA_DROPOUT,
        target_modules=list(target_modules), modules_to_save=list(modules_to_save) or None,
    )  # fmt: skip
    return peft.get_peft_model(model, config)


class Optimizers:
    """The LoRA optimizer of one method and the shared head AdamW, stepped together.

    For ``full-adamw`` there is one AdamW over every weight of the model (no adapters).
    """

    def __init__(self, model: nn.Module, method: str, lr: float) -> None:
        name, hparams = METHODS[method]
        self.optimizers: list[torch.optim.Optimizer] = []
        if name == "full":
            self.optimizers.append(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0))
            return
        pairs = lorsum_peft.lora_pairs(model)
        self.optimizers.append(
            lorsum.create_optimizer(model, name, pairs=pairs, dense=False, lr=lr, **hparams)
        )
        head = lorsum.dense_parameters(model, pairs)
        if head:
            self.optimizers.append(torch.optim.AdamW(head, lr=HEAD_LR, weight_decay=0.0))

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def close(self) -> None:
        """Remove the gradient-capture hooks of capture-based methods."""
        for optimizer in self.optimizers:
            capture = getattr(optimizer, "capture", None)
            if capture is not None:
                capture.remove()


def prepare(model: nn.Module, method: str, target_modules: Sequence[str], rank: int, *,
            modules_to_save: Sequence[str] = ()) -> nn.Module:  # fmt: skip
    """The model a method trains: adapters added, except for full fine-tuning."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if METHODS[method][0] == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    return add_adapters(model, target_modules, rank, modules_to_save=modules_to_save)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
