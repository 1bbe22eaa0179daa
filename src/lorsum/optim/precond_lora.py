"""PrecondLoRA: Riemannian / ScaledGD-preconditioned LoRA gradients on torch's SGD or AdamW."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lorsum.functional.preconditioning import riemannian_precondition
from lorsum.optim._base import (
    LoRAOptimizer,
    PairWork,
    _check_betas,
    _check_bool,
    _check_choice,
    _check_fraction,
    _check_non_negative,
    _check_positive,
)
from lorsum.optim._stacking import group_stacks, hyperparameter_key

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
        foreach: step pairs of equal shapes, dtypes and hyperparameters as one stack (default):
            one batched r×r solve per factor and one multi-tensor torch update for all of them;
            ``False`` steps every pair alone, with torch's single-tensor update.
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
        foreach: bool = True,
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
            "foreach": foreach,
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
        _check_bool(group, "foreach")

    def _step_lora_groups(self, work: list[PairWork]) -> None:
        # Pairs that agree on shapes, dtypes, hyperparameters, which gradients exist and which
        # moments they hold are stepped as one stack: one batched r×r solve per factor and one
        # multi-tensor torch update for all of them, instead of a Python loop per layer.
        def key(item: PairWork) -> Any:
            group, A, B, _ = item
            if A.grad is None and B.grad is None:
                return None
            if not group["foreach"]:
                return id(B)
            return (
                (tuple(A.shape), tuple(B.shape), A.dtype, B.dtype, A.device),
                (A.grad is None, B.grad is None, tuple(self._guarded(A, B))),
                hyperparameter_key(group),
            )

        for members in group_stacks(work, key):
            self._step_stack([(group, A, B) for group, A, B, _ in members])

    def _step_stack(self, members: list[tuple[dict[str, Any], Tensor, Tensor]]) -> None:
        group = members[0][0]  # every member has the same hyperparameters (the stack's key)
        As, Bs = [A for _, A, _ in members], [B for _, _, B in members]
        A, B = torch.stack(As), torch.stack(Bs)
        grad_A = torch.stack([a.grad if a.grad is not None else torch.zeros_like(a) for a in As])
        grad_B = torch.stack([b.grad if b.grad is not None else torch.zeros_like(b) for b in Bs])
        damping, base, foreach = group["damping"], group["base"], group["foreach"]
        # torch's update writes A, B and their moments in place, so a non-finite gradient would
        # reach all of them: keep the pre-step values (a moment this step creates starts from
        # zeros, torch's initial value; for SGD's buffer, dampening 0 makes a zero buffer and no
        # buffer step alike) and let the commit below decide what each pair keeps.
        before = {key: torch.stack(_slot(self, key, As, Bs)) for key in self._guarded(As[0], Bs[0])}
        pre_A, pre_B = riemannian_precondition(A, B, grad_A, grad_B, damping=damping)
        if group["order"] == "simultaneous":
            directions = [*pre_A.unbind(0), *pre_B.unbind(0)]
            self._torch_step(group, As + Bs, directions, base, foreach=foreach)
        else:
            self._torch_step(group, As, list(pre_A.unbind(0)), base, foreach=foreach)
            # B's preconditioner is built from the new A (the official code's order).
            _, pre_B = riemannian_precondition(torch.stack(As), B, grad_A, grad_B, damping=damping)
            self._torch_step(group, Bs, list(pre_B.unbind(0)), base, foreach=foreach)
        updates = []
        for key in self._guarded(As[0], Bs[0]):  # with the moments this step created
            targets = _slot(self, key, As, Bs)
            new = torch.stack(targets)
            old = before[key] if key in before else torch.zeros_like(new)
            torch._foreach_copy_(targets, list(old.unbind(0)))  # the commit writes what is kept
            updates.append((targets, old, new))
        self._commit_stack_([self.state[b] for b in Bs], updates)

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


def _slot(
    opt: PrecondLoRA, key: tuple[int, str], As: list[Tensor], Bs: list[Tensor]
) -> list[Tensor]:
    """The tensor ``key`` names (a factor, or one of its moments) for every pair of a stack."""
    factors = As if key[0] == 0 else Bs
    return [p if key[1] == "param" else opt.state[p][key[1]] for p in factors]
