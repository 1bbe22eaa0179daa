"""PrecondLoRA: Riemannian / ScaledGD-preconditioned LoRA gradients on torch's SGD or AdamW."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lorsum.capture import CapturedGradient
from lorsum.functional.preconditioning import riemannian_precondition
from lorsum.optim._base import (
    LoRAOptimizer,
    _check_betas,
    _check_choice,
    _check_fraction,
    _check_non_negative,
    _check_positive,
)

__all__ = ["PrecondLoRA"]


class PrecondLoRA(LoRAOptimizer):
    r"""Riemannian-preconditioned LoRA (ScaledGD): precondition the factor gradients, then step.

    .. math::

        \hat g_A = (B^T B + \delta I)^{-1} \nabla_A, \qquad
        \hat g_B = \nabla_B (A A^T + \delta I)^{-1}

    then ``base="sgd"`` (torch's SGD: momentum, dampening 0, coupled weight decay) or
    ``base="adamw"`` (torch's AdamW, moments of the preconditioned gradients) on ``A`` and ``B``.
    It uses autograd's ``A.grad`` and ``B.grad`` (no capture), which already contain the LoRA
    scaling. ``order="simultaneous"`` (default, PEFT's choice) builds both preconditioners from
    the factors before the step; ``"sequential"`` (the official code's) steps ``A`` first and
    builds ``B``'s preconditioner from the new ``A``.

    A step whose new ``A``, ``B`` or moments are not all finite (a non-finite gradient) leaves
    them as they were and counts ``state[B]["skipped_steps"]``; torch's ``step`` count still
    advances.

    With SGD, no momentum, ``s = 1``, ``lr = η`` and ``δ = damping_LoRSum · η``, one
    simultaneous step equals ``LoRSum(num_iters=0)`` (the Jacobi pass).

    Args:
        params: param groups from :func:`lorsum.pair_param_groups` (and dense groups).
        lr: learning rate (default: 1e-3).
        base: ``"sgd"`` or ``"adamw"`` (default).
        damping: ``δ >= 0`` (default: 1e-2, PEFT's ``reg``; upstream tunes it per task).
        order: ``"simultaneous"`` (default) or ``"sequential"``.
        momentum: SGD momentum (default: 0). betas, eps: AdamW's (defaults: (0.9, 0.999), 1e-8).
        weight_decay: as the base optimizer applies it (default: 0).
        max_grad_norm: global clipping of the raw gradients, before preconditioning.
        nonfinite: ``"skip_pair"`` (default) or ``"skip_all"`` (see
            :class:`~lorsum.optim.LoRAOptimizer`).

    Reference:
        Zhang & Pilanci, arXiv:2402.02347 (github.com/pilancilab/Riemannian_Preconditioned_LoRA).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        *,
        base: str = "adamw",
        damping: float = 1e-2,
        order: str = "simultaneous",
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip_pair",
    ) -> None:
        defaults = {
            "lr": lr,
            "base": base,
            "damping": damping,
            "order": order,
            "momentum": momentum,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "nesterov": False,
        }
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, nonfinite=nonfinite)

    def _check_lora_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._check_lora_hyperparameters(group)
        _check_non_negative(group, "damping")
        _check_choice(group, "base", ("sgd", "adamw"))
        _check_choice(group, "order", ("simultaneous", "sequential"))
        _check_fraction(group, "momentum")
        _check_betas(group)
        _check_positive(group, "eps")

    def _step_lora_group(
        self, group: dict[str, Any], A: Tensor, B: Tensor, captured: CapturedGradient | None
    ) -> None:
        if A.grad is None and B.grad is None:
            return
        grad_A = A.grad if A.grad is not None else torch.zeros_like(A)
        grad_B = B.grad if B.grad is not None else torch.zeros_like(B)
        damping = group["damping"]
        # torch's update writes A, B and their moments in place, so a non-finite gradient would
        # reach all of them: keep the pre-step values and restore them below if so.
        before = {key: value.clone() for key, value in self._guarded(A, B).items()}
        pre_A, pre_B = riemannian_precondition(A, B, grad_A, grad_B, damping=damping)
        if group["order"] == "simultaneous":
            self._torch_step(group, [A, B], [pre_A, pre_B], group["base"])
        else:
            self._torch_step(group, [A], [pre_A], group["base"])
            _, pre_B = riemannian_precondition(A, B, grad_A, grad_B, damping=damping)
            self._torch_step(group, [B], [pre_B], group["base"])
        updates = []
        for key, target in self._guarded(A, B).items():
            # A moment created by this step started from zeros (torch's initial value; for SGD's
            # buffer, dampening 0 makes a zero buffer and no buffer step alike).
            old = before.get(key)
            new = target.clone()
            target.copy_(torch.zeros_like(target) if old is None else old)
            updates.append((target, new))
        self._commit_(self.state[B], updates)

    def _guarded(self, A: Tensor, B: Tensor) -> dict[tuple[int, str], Tensor]:
        """``A``, ``B`` and their moment tensors (not torch's CPU ``step`` count, which advances
        even on a skipped step, as in LoRA-Pro: restoring it would need a device read)."""
        out: dict[tuple[int, str], Tensor] = {(0, "param"): A, (1, "param"): B}
        for i, p in enumerate((A, B)):
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                value = self.state[p].get(key) if p in self.state else None
                if value is not None:
                    out[(i, key)] = value
        return out
