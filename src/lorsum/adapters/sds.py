"""SDS-LoRA: singular values decoupled from the backward pass (spec ``related-methods.md`` §2).

A layer starts as plain LoRA, ``y = W0 x + s B A x``. After a short warm-up it is *activated*:
the pair is re-split, function-preservingly, into two branches around frozen orthonormal bases,

    y = W0 x + s (B (Q_A x) + Q_B (A x)),     Q_B (m, r) orthonormal columns, Q_A (r, n) rows,

so that ``∂L/∂B = s G Q_Aᵀ`` and ``∂L/∂A = s Q_Bᵀ G`` no longer depend on the singular values
of ``A`` and ``B`` (plain LoRA's ``s G Aᵀ`` and ``s Bᵀ G`` do). The bases are refreshed now and
then (:func:`lorsum.functional.sds_refresh_due`) to follow ``row(A)`` and ``col(B)``.

Choices where the paper's method section was not available (spec §2, marked unverified):

* bases from thin QR (not polar factors), each column's sign aligned with the previous basis;
* the activation is exact: QR of both factors and the SVD of the ``r × r`` core (the authors
  use a randomised SVD), optimizer state of ``A`` and ``B`` cleared at activation;
* scale ``s = alpha / √r`` (rsLoRA) by default, as in the authors' scripts;
* a refresh changes the function slightly, as in the reference code; it is skipped for a layer
  whose factors have a column/row of norm ``≤ 1e-2``.

Which optimizers apply: torch's AdamW (the method's own) and SGD. lorsum's LoRSum, ScaledLoRSum,
SVDLoRA, PrecondLoRA and LoRA-Pro do not: after activation ``ΔW = s (B Q_A + Q_B A)`` is not a
single pair ``B A`` with both factors trained, and SDS-LoRA is itself a fix of the same
anisotropic scaling that those optimizers remove.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lorsum._modules import LinearTarget, replace_module, select_linears
from lorsum.functional.sds import sds_activate, sds_refresh, sds_refresh_due

__all__ = ["SDSLoRALinear", "SDSLoRASchedule", "add_sds_lora", "sds_lora_state_dict"]


class SDSLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus an SDS-LoRA update, plain LoRA until :meth:`activate`.

    Args:
        base: the layer to adapt (frozen).
        rank: ``1 ≤ r ≤ min(m, n)``.
        alpha: the scale's numerator (default 4, the authors' value).
        dropout: dropout on the adapter's input.
        use_rslora: ``s = alpha / √r`` (default, the authors' choice) or ``alpha / r``.

    Parameters ``lora_A (r, n)`` (Kaiming-uniform) and ``lora_B (m, r)`` (zero), so the layer
    starts as ``base``; buffers ``basis_A (r, n)``, ``basis_B (m, r)`` and ``active`` (all in the
    ``state_dict``, so a saved layer resumes in the right phase).
    """

    def __init__(
        self, base: nn.Linear, rank: int, *, alpha: float = 4.0, dropout: float = 0.0,
        use_rslora: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SDSLoRALinear adapts nn.Linear layers, got {type(base).__name__}")
        m, n = base.weight.shape
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
            raise ValueError(f"Invalid rank: {rank!r} (must be an int in [1, {min(m, n)}])")
        if not alpha > 0:
            raise ValueError(f"Invalid alpha: {alpha} (must be > 0)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Invalid dropout: {dropout} (must satisfy 0 <= dropout < 1)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.lora_A = nn.Parameter(torch.empty(rank, n, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's lora_A init
        self.lora_B = nn.Parameter(torch.zeros(m, rank, **factory))
        self.register_buffer("basis_A", torch.zeros(rank, n, **factory))
        self.register_buffer("basis_B", torch.zeros(m, rank, **factory))
        self.register_buffer("active", torch.tensor(False, device=factory["device"]))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # A host-side copy of the ``active`` buffer: the forward branches on it, and reading
        # the buffer itself on an accelerator would synchronise every forward pass.
        self._active_on_host: bool | None = False

    @property
    def is_active(self) -> bool:
        if self._active_on_host is None:  # after load_state_dict: read the buffer once
            self._active_on_host = bool(self.active)
        return self._active_on_host

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._active_on_host = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = self.dropout(x)
        if not self.is_active:
            return out + self.scaling * (h @ self.lora_A.T) @ self.lora_B.T
        two_branches = (h @ self.basis_A.T) @ self.lora_B.T + (h @ self.lora_A.T) @ self.basis_B.T
        return out + self.scaling * two_branches

    @torch.no_grad()
    def activate(self) -> None:
        """Re-split ``s B A`` into the two branches (exactly: the output is unchanged)."""
        if self.is_active:
            raise RuntimeError("this SDS-LoRA layer is active already")
        A, B, basis_A, basis_B = sds_activate(self.lora_A, self.lora_B, self.scaling)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self.basis_A.copy_(basis_A)
        self.basis_B.copy_(basis_B)
        self.active.fill_(True)
        self._active_on_host = True

    @torch.no_grad()
    def refresh(self, norm_floor: float = 1e-2) -> bool:
        """Re-orthonormalise the bases onto ``row(A)`` and ``col(B)``; ``False`` if skipped."""
        if not self.is_active:
            raise RuntimeError("refresh() needs an active layer: call activate() first")
        bases = sds_refresh(
            self.lora_A, self.lora_B, self.basis_A, self.basis_B, norm_floor=norm_floor
        )
        if bases is None:
            return False
        self.basis_A.copy_(bases[0])
        self.basis_B.copy_(bases[1])
        return True

    def lora_export(self) -> tuple[Tensor, Tensor]:
        """The update as one rank-``2r`` LoRA pair with the same scale:
        ``(A_exp (2r, n), B_exp (m, 2r))`` with ``s B_exp A_exp = ΔW``."""
        if not self.is_active:
            return self.lora_A.detach().clone(), self.lora_B.detach().clone()
        A = torch.cat([self.basis_A, self.lora_A.detach()], dim=0)
        B = torch.cat([self.lora_B.detach(), self.basis_B], dim=1)
        return A, B

    def delta_weight(self) -> Tensor:
        """The dense ``ΔW (m, n)`` (for merging and tests)."""
        A, B = self.lora_export()
        return self.scaling * B @ A

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``ΔW`` into the base weight; the adapter path is then skipped."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take ``ΔW`` back out of the base weight."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:.4g}, active={self.is_active}"


def add_sds_lora(
    model: nn.Module, target: LinearTarget, rank: int, *, alpha: float = 4.0,
    dropout: float = 0.0, use_rslora: bool = True,
) -> list[SDSLoRALinear]:  # fmt: skip
    """Replace chosen ``nn.Linear`` sub-modules of ``model`` by :class:`SDSLoRALinear`, in place.

    ``target``: module names exactly as ``model.named_modules()`` spells them, or a predicate
    ``(name, linear) -> bool``. Returns the new layers in that order.

    Raises:
        ValueError: a target that does not exist or is not an ``nn.Linear``, no match, or a bad
            rank, alpha or dropout.
    """
    layers = []
    for name, linear in select_linears(model, target, "add_sds_lora"):
        layer = SDSLoRALinear(linear, rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        replace_module(model, name, layer)
        layers.append(layer)
    return layers


def sds_lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint of the adapters needs (factors, bases and phase of every SDS-LoRA
    layer), keyed as in ``model.state_dict()``: load it with ``model.load_state_dict(state,
    strict=False)`` into a model built with the same :func:`add_sds_lora` call."""
    keep = ("lora_A", "lora_B", "basis_A", "basis_B", "active")
    return {
        f"{name}.{key}": tensor.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, SDSLoRALinear)
        for key, tensor in module.state_dict().items()
        if key in keep
    }


class SDSLoRASchedule:
    """The method's schedule, driven by one call to :meth:`step` after each optimizer step.

    * steps ``1 … warmup_steps``: plain LoRA;
    * after step ``warmup_steps``: every layer is activated and the optimizer's state of its
      factors is cleared (``reset_opt_state``), since their meaning changed;
    * after a later step ``t`` with :func:`~lorsum.functional.sds_refresh_due`: every active
      layer's bases are refreshed (layers with a near-zero factor column or row skip it).

    Args:
        layers: the SDS-LoRA layers (from :func:`add_sds_lora`).
        optimizer: the optimizer of their factors (its state is cleared at activation).
        total_steps: the run's optimizer steps (the refresh phases split them).
        warmup_steps, refresh_phases, refresh_norm_floor, reset_opt_state: the library
            defaults of spec §2.3 (10, 5, 1e-2, True).

    ``state_dict``/``load_state_dict`` keep the step count for resuming.
    """

    def __init__(
        self, layers: Iterable[SDSLoRALinear], optimizer: torch.optim.Optimizer | None, *,
        total_steps: int, warmup_steps: int = 10, refresh_phases: int = 5,
        refresh_norm_floor: float = 1e-2, reset_opt_state: bool = True,
    ) -> None:  # fmt: skip
        self.layers: Sequence[SDSLoRALinear] = list(layers)
        if not self.layers:
            raise ValueError("SDSLoRASchedule needs at least one SDSLoRALinear layer")
        if total_steps < 1 or warmup_steps < 0 or refresh_phases < 1:
            raise ValueError(
                f"need total_steps ≥ 1, warmup_steps ≥ 0 and refresh_phases ≥ 1, got "
                f"{total_steps}, {warmup_steps} and {refresh_phases}"
            )
        self.optimizer = optimizer
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.refresh_phases, self.refresh_norm_floor = refresh_phases, refresh_norm_floor
        self.reset_opt_state = reset_opt_state
        self.step_count = 0
        self.refreshes = 0  # layer refreshes done (skipped ones not counted)
        if warmup_steps == 0:  # no warm-up: SDS-LoRA from the first step
            self._activate()

    def step(self) -> None:
        self.step_count += 1
        t = self.step_count
        if t == self.warmup_steps:
            self._activate()
        elif sds_refresh_due(
            t, self.total_steps, warmup_steps=self.warmup_steps, phases=self.refresh_phases
        ):
            self.refreshes += sum(
                layer.refresh(self.refresh_norm_floor) for layer in self.layers if layer.is_active
            )

    def _activate(self) -> None:
        for layer in self.layers:
            if not layer.is_active:
                layer.activate()
                if self.reset_opt_state and self.optimizer is not None:
                    for p in (layer.lora_A, layer.lora_B):
                        self.optimizer.state.pop(p, None)

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count, self.refreshes = int(state["step_count"]), int(state["refreshes"])
