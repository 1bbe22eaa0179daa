"""What the fine-tuning tasks (``glue``, ``squad``, ``lm``) share: the methods and their optimizers.

Every method trains the same PEFT LoRA adapters on a pretrained model; only the optimizer of the
adapters differs. Parameters outside the adapters (a new classification or span head) are
stepped by one AdamW at ``HEAD_LR`` for every method, so that the head never decides a
comparison. ``full-adamw`` is the upper reference: no adapters, AdamW on every weight.

Settings common to all methods, stated once: constant learning rate (the reference's tuning
runs use constant rates), no gradient clipping, no weight decay, LoRA dropout 0.1 with
``lora_alpha = r`` (scaling 1), as in the paper's GLUE runs (spec ``lorsum.md`` §6.4).

``ADAPTERS`` are the other parameterisations of the update (issue 5): SDS-LoRA, MiSS (PEFT's
balance form), Bat (``lorsum.adapters.BatLinear``) and LoLDU, each trained by AdamW on the same
layers with the same trainable budget as LoRA at rank ``r`` (``r·(m + n)`` per layer), except
LoLDU, whose largest budget is ``min(m, n)`` per layer (every pivot of the LU trained):

* ``sds-lora``: rank ``r``, scaling 1 (``alpha = r`` without rsLoRA, as the LoRA runs), dropout
  0.1, the library's schedule (10 plain-LoRA steps, then 5 refresh phases): ``r·(m + n)``.
* ``miss``: rank ``2r`` on square layers (``2r·m = r·(m + n)``), dropout 0.1.
* ``bat``: block size ``2r`` (``m·2r``); no dropout (the form has none).
* ``loldu``: rank ``min(m, n)``, the scaling left at 1; no dropout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import lorsum
from lorsum import adapters
from lorsum.adapters import (
    BatLinear,
    LoLDULinear,
    SDSLoRALinear,
    SDSLoRASchedule,
    miss_trainable_parameters,
)
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


# adapter method -> its settings, recorded in every run's config (see the module docstring)
ADAPTERS: dict[str, dict[str, Any]] = {
    "sds-lora": {"adapter": "sds-lora", "rank_factor": 1, "dropout": LORA_DROPOUT},
    "miss": {"adapter": "miss", "rank_factor": 2, "dropout": LORA_DROPOUT},
    "bat": {"adapter": "bat", "rank_factor": 2},
    "loldu": {"adapter": "loldu", "rank": "min(m, n)"},
}


def adapter_methods() -> dict[str, tuple[str, dict[str, Any]]]:
    """The adapter methods in the form of ``METHODS``: every one is trained by AdamW."""
    return {name: ("adamw", dict(settings)) for name, settings in ADAPTERS.items()}


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
    ``overrides`` replace or add hyperparameters of the LoRA optimizer (the step-cost suite's
    ``step_in_backward=True``, say).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str,
        lr: float,
        *,
        steps: int = 1,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedule: SDSLoRASchedule | None = None
        if method in ADAPTERS:
            self._adapter_optimizers(model, method, lr, steps)
            return
        name, hparams = METHODS[method]
        if name == "full":
            self.optimizers.append(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0))
            return
        pairs = lorsum_peft.lora_pairs(model)
        self.optimizers.append(
            lorsum.create_optimizer(
                model, name, pairs=pairs, dense=False, lr=lr, **{**hparams, **(overrides or {})}
            )
        )
        head = lorsum.dense_parameters(model, pairs)
        if head:
            self.optimizers.append(torch.optim.AdamW(head, lr=HEAD_LR, weight_decay=0.0))

    def _adapter_optimizers(self, model: nn.Module, method: str, lr: float, steps: int) -> None:
        """AdamW at ``lr`` on the adapter's tensors and at ``HEAD_LR`` on the rest (the head)."""
        if method == "miss":
            adapter = list(miss_trainable_parameters(model).values())
        else:
            layer_type = {"sds-lora": SDSLoRALinear, "bat": BatLinear, "loldu": LoLDULinear}
            adapter = [
                p
                for module in model.modules()
                if isinstance(module, layer_type[method])
                for p in module.parameters()
                if p.requires_grad
            ]
        if not adapter:
            raise ValueError(f"{method}: the model has no trainable adapter tensors")
        chosen = {id(p) for p in adapter}
        head = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
        self.optimizers.append(torch.optim.AdamW(adapter, lr=lr, weight_decay=0.0))
        if head:
            self.optimizers.append(torch.optim.AdamW(head, lr=HEAD_LR, weight_decay=0.0))
        if method == "sds-lora":
            layers = [m for m in model.modules() if isinstance(m, SDSLoRALinear)]
            self.schedule = SDSLoRASchedule(layers, self.optimizers[0], total_steps=steps)

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()
        if self.schedule is not None:
            self.schedule.step()

    def close(self) -> None:
        """Remove the gradient-capture hooks of capture-based methods."""
        for optimizer in self.optimizers:
            capture = getattr(optimizer, "capture", None)
            if capture is not None:
                capture.remove()


def prepare(model: nn.Module, method: str, target_modules: Sequence[str], rank: int, *,
            modules_to_save: Sequence[str] = ()) -> nn.Module:  # fmt: skip
    """The model a method trains: adapters added, except for full fine-tuning.

    PEFT LoRA for the ``METHODS``; for the ``ADAPTERS``, the adapter on the ``nn.Linear`` layers
    whose names end in one of ``target_modules``, everything else frozen except the modules
    named in ``modules_to_save`` (a new head), which train whole.
    """
    if method in ADAPTERS:
        return _add_other_adapter(model, method, target_modules, rank, modules_to_save)
    if method not in METHODS:
        known = ", ".join([*METHODS, *ADAPTERS])
        raise ValueError(f"unknown method {method!r} (choose from {known})")
    if METHODS[method][0] == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    return add_adapters(model, target_modules, rank, modules_to_save=modules_to_save)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _add_other_adapter(
    model: nn.Module, method: str, target_modules: Sequence[str], rank: int,
    modules_to_save: Sequence[str],
) -> nn.Module:  # fmt: skip
    settings = ADAPTERS[method]
    if method == "miss":
        import peft

        config = adapters.miss_config(
            list(target_modules), r=settings["rank_factor"] * rank, dropout=settings["dropout"],
            modules_to_save=list(modules_to_save) or None,
        )  # fmt: skip
        return peft.get_peft_model(model, config)
    model.requires_grad_(False)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in target_modules)
    ]
    if not names:
        raise ValueError(f"{method}: no nn.Linear of the model matches {list(target_modules)}")
    if method == "sds-lora":
        adapters.add_sds_lora(
            model, names, rank, alpha=float(rank), dropout=settings["dropout"], use_rslora=False
        )
    elif method == "bat":
        adapters.add_bat(model, names, block_size=settings["rank_factor"] * rank)
    else:
        shapes = [model.get_submodule(name).weight.shape for name in names]
        adapters.add_loldu(model, names, rank=min(min(shape) for shape in shapes))
    for name in modules_to_save:
        matches = [m for n, m in model.named_modules() if n == name or n.endswith("." + name)]
        if not matches:
            raise ValueError(f"{method}: no module of the model is named {name!r} (a new head)")
        for module in matches:
            module.requires_grad_(True)
    return model
