"""``create_optimizer``: any lorsum method (or baseline) for a model, with its capture.

The builder is the one place that sees the model: it finds the LoRA pairs (lorsum's
:class:`~lorsum.LoRALinear` layers, or PEFT's LoRA layers), puts every other trainable parameter
in a dense group, creates the :class:`~lorsum.GradientCapture` when the method needs the full
gradient, and returns a ``torch.optim.Optimizer``. The optimizers themselves never hold the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorsum.capture import GradientCapture
from lorsum.layers import LoRALinear
from lorsum.layers import lora_pairs as lorsum_lora_pairs
from lorsum.lora import LoRAPair, dense_param_group, dense_parameters, pair_param_groups
from lorsum.optim.lora_plus import lora_plus_param_groups
from lorsum.optim.lora_pro import LoRAPro
from lorsum.optim.lorsum import LoRSum
from lorsum.optim.precond_lora import PrecondLoRA
from lorsum.optim.scaled_lorsum import ScaledLoRSum
from lorsum.optim.svd_lora import SVDLoRA

__all__ = ["METHODS", "create_optimizer", "find_lora_pairs"]

METHODS = (
    "lorsum",
    "scaled_lorsum",
    "svdlora",
    "precond_sgd",
    "precond_adamw",
    "lora_pro",
    "loraplus",
    "adamw",
    "sgd",
)


# The methods that step with the captured full gradient (and so can step in backward).
_CAPTURE_OPTIMIZERS = {"lorsum": LoRSum, "scaled_lorsum": ScaledLoRSum, "svdlora": SVDLoRA}


def find_lora_pairs(model: nn.Module) -> list[LoRAPair]:
    """The model's adapters: lorsum's ``LoRALinear`` layers, else PEFT's LoRA layers.

    Raises:
        ValueError: the model has neither.
        ImportError: the model has no ``LoRALinear`` and peft is not installed.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        return lorsum_lora_pairs(model)
    from lorsum.integrations.peft import lora_pairs as peft_lora_pairs

    return peft_lora_pairs(model)


def create_optimizer(
    model: nn.Module,
    method: str = "lorsum",
    *,
    pairs: Sequence[LoRAPair] | None = None,
    dense: bool = True,
    dense_lr: float = 1e-3,
    dense_optimizer: str = "adamw",
    grad_scaler: Any | None = None,
    **hparams: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer of ``method`` for ``model``'s LoRA adapters and other parameters.

    Args:
        model: a model with :class:`~lorsum.LoRALinear` layers or PEFT LoRA layers.
        method: one of :data:`METHODS`: ``"lorsum"``, ``"scaled_lorsum"``, ``"svdlora"``
            (capture the full gradient); ``"precond_sgd"``, ``"precond_adamw"``, ``"lora_pro"``
            (use autograd's LoRA gradients); ``"loraplus"``, ``"adamw"``, ``"sgd"`` (torch's
            own optimizers with explicit groups).
        pairs: the adapters to train (default: all of them, see :func:`find_lora_pairs`).
        dense: put every other trainable parameter in a dense group (default). ``False`` leaves
            them out, for a separate optimizer (for example one AdamW shared by every method
            of a comparison, so that only the LoRA optimizer differs).
        dense_lr: learning rate of the other trainable parameters (heads, biases).
        dense_optimizer: ``"adamw"`` or ``"sgd"`` for them (lorsum's optimizers only).
        grad_scaler: a ``torch.amp.GradScaler`` when training with fp16 loss scaling.
        **hparams: the method's hyperparameters (``lr``, ``num_iters``, ``damping``, ...);
            the capture-based methods also take ``step_in_backward=True`` (each pair stepped
            inside ``backward()``, see :class:`~lorsum.optim._base.LoRAOptimizer`) and
            ``factor_grads=False`` (autograd skips ``A.grad`` and ``B.grad``, which they never
            read; see :class:`~lorsum.GradientCapture`).

    Returns:
        The optimizer. For capture-based methods ``optimizer.capture`` is the
        :class:`~lorsum.GradientCapture` whose hooks sit on ``model``; call
        ``optimizer.capture.remove()`` to detach it.

    Raises:
        ValueError: an unknown method, a model without adapters, or ``step_in_backward`` or
            ``factor_grads=False`` for a method that does not capture the full gradient.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method: {method!r} (must be one of {', '.join(METHODS)})")
    if hparams.get("step_in_backward") and method not in _CAPTURE_OPTIMIZERS:
        raise ValueError(
            f"step_in_backward=True: method {method!r} steps with autograd's LoRA gradients, "
            f"not a captured full gradient; only {', '.join(map(repr, _CAPTURE_OPTIMIZERS))} "
            "step in backward"
        )
    factor_grads = hparams.pop("factor_grads", True)
    if factor_grads is not True and method not in _CAPTURE_OPTIMIZERS:
        raise ValueError(
            f"factor_grads={factor_grads!r}: method {method!r} steps with autograd's LoRA "
            f"gradients, so it needs them; only {', '.join(map(repr, _CAPTURE_OPTIMIZERS))} "
            "can skip them"
        )
    pairs = list(find_lora_pairs(model) if pairs is None else pairs)
    others = dense_parameters(model, pairs) if dense else []
    lr = hparams.pop("lr", 1e-3)

    if method in ("adamw", "sgd", "loraplus"):
        ratio = hparams.pop("loraplus_lr_ratio", 16.0) if method == "loraplus" else 1.0
        weight_decay = hparams.pop("weight_decay", 0.0)
        groups = lora_plus_param_groups(
            pairs, lr=lr, loraplus_lr_ratio=ratio, weight_decay=weight_decay,
            dense_params=others, dense_lr=dense_lr,
        )  # fmt: skip
        cls = torch.optim.SGD if method == "sgd" else torch.optim.AdamW
        return cls(groups, lr=lr, **hparams)

    groups = pair_param_groups(pairs)
    if others:
        groups.append(dense_param_group(others, lr=dense_lr, dense_optimizer=dense_optimizer))
    if method in ("precond_sgd", "precond_adamw"):
        base = "sgd" if method == "precond_sgd" else "adamw"
        return PrecondLoRA(groups, lr=lr, base=base, **hparams)
    if method == "lora_pro":
        return LoRAPro(groups, lr=lr, **hparams)

    statistics = None
    if method == "scaled_lorsum" and hparams.get("metric", "kfac") == "kfac":
        statistics = hparams.get("metric_form", "diagonal")
    capture = GradientCapture(
        pairs, grad_scaler=grad_scaler, statistics=statistics, factor_grads=factor_grads
    )
    cls = _CAPTURE_OPTIMIZERS[method]
    try:
        return cls(groups, lr=lr, capture=capture, **hparams)
    except BaseException:
        capture.remove()  # a failed construction must not leave hooks on the user's model
        raise
