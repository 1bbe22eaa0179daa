"""Trained rank pruning (TRP; spec ``related-methods.md`` §7): train full weights while keeping
them low-rank, then split each layer into two thin ones.

Every ``period`` steps, each layer in scope is replaced in place by its truncation to the rank
that keeps ``energy`` of its squared singular values, and on those steps ``nuclear_weight · U Vᵀ``
(a subgradient of the nuclear norm at the truncated weight) is added to its gradient. At the end
:meth:`TrainedRankPruning.finalize` splits every layer by truncated SVD.

Usage, around any optimizer::

    trp = TrainedRankPruning(model, ["fc1", "fc2"], energy=0.9, period=5, nuclear_weight=3e-4)
    for x, y in data:
        trp.project_if_due()                   # before the forward
        loss_fn(model(x), y).backward()
        trp.add_nuclear_subgradient()          # after the backward, before the step
        optimizer.step(); optimizer.zero_grad()
    trp.finalize()                             # two thin layers per target

Layers: ``nn.Linear`` (the matrix is the weight) and ``nn.Conv2d`` in the channel-wise view
``N × (C·k_h·k_w)`` of the paper's NC scheme, split into a ``k``-channel convolution followed by
a 1 × 1 one (the spatial VH and network-decoupling ND views are not implemented).

``solver="lorsum"`` warm-starts each truncation from the previous one with a few LoRSum sweeps
(:func:`~lorsum.functional.warm_energy_truncation`) and falls back to the SVD only when the warm
fit keeps less than ``energy``: ``O(sweeps · m n k)`` per layer instead of ``O(m n min(m, n))``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from lorsum._modules import replace_module
from lorsum.compression.lord import LowRankLinear
from lorsum.functional.feature import energy_rank
from lorsum.functional.trp import Truncation, energy_truncation, warm_energy_truncation

__all__ = ["LayerReport", "TrainedRankPruning", "split_layer"]

Prunable = nn.Linear | nn.Conv2d


@dataclass(frozen=True)
class LayerReport:
    """One layer's split: its matrix shape, kept rank and parameter counts before and after."""

    name: str
    shape: tuple[int, int]
    rank: int
    parameters_before: int
    parameters_after: int


class TrainedRankPruning:
    """The TRP training wrapper over chosen layers of ``model``.

    Args:
        model: the model (its layers are modified in place).
        target: names of ``nn.Linear`` / ``nn.Conv2d`` modules as ``model.named_modules()``
            spells them.
        energy: the fraction of ``Σσ²`` each truncation keeps, in ``(0, 1]`` (paper: 0.9).
        period: project every ``period`` steps, from the first (paper's code: 1).
        nuclear_weight: ``λ`` of the nuclear-norm subgradient (0: off, the default upstream).
        solver: ``"svd"`` (a full SVD per projection) or ``"lorsum"`` (warm-started sweeps).
        sweeps: LoRSum sweeps per warm-started truncation.

    Counters ``svd_calls`` and ``warm_calls`` say how the truncations were computed.
    """

    def __init__(
        self, model: nn.Module, target: Iterable[str], *, energy: float = 0.9, period: int = 1,
        nuclear_weight: float = 0.0, solver: str = "svd", sweeps: int = 2,
    ) -> None:  # fmt: skip
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if not nuclear_weight >= 0.0:
            raise ValueError(f"nuclear_weight must be >= 0, got {nuclear_weight}")
        if solver not in ("svd", "lorsum"):
            raise ValueError(f"solver must be 'svd' or 'lorsum', got {solver!r}")
        if sweeps < 1:
            raise ValueError(f"sweeps must be >= 1, got {sweeps}")
        modules = dict(model.named_modules())
        self.layers: dict[str, Prunable] = {}
        for name in dict.fromkeys(target):
            module = modules.get(name)
            if module is None:
                raise ValueError(f"TrainedRankPruning: the model has no module named {name!r}")
            if not isinstance(module, Prunable):
                raise ValueError(
                    f"TrainedRankPruning: {name!r} is a {type(module).__name__}, "
                    "not an nn.Linear or nn.Conv2d"
                )
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ValueError(
                    f"TrainedRankPruning: {name!r} is a grouped convolution "
                    f"(groups={module.groups}); only groups=1 has the channel-wise view"
                )
            self.layers[name] = module
        if not self.layers:
            raise ValueError("TrainedRankPruning: no target layer given")
        self.model, self.energy, self.period = model, energy, period
        self.nuclear_weight, self.solver, self.sweeps = nuclear_weight, solver, sweeps
        self.step_count = 0  # projections happen before steps 0, period, 2·period, ...
        self.svd_calls = self.warm_calls = 0
        self._truncations: dict[str, Truncation] = {}
        self._projected_now = False

    @torch.no_grad()
    def project_if_due(self) -> bool:
        """Before the forward: truncate every layer if this step is a projection step."""
        self._projected_now = self.step_count % self.period == 0
        self.step_count += 1
        if not self._projected_now:
            return False
        for name, layer in self.layers.items():
            matrix = matrix_view(layer.weight)
            truncation = None
            if self.solver == "lorsum" and name in self._truncations:
                truncation = warm_energy_truncation(
                    matrix, self._truncations[name], self.energy, sweeps=self.sweeps
                )
                self.warm_calls += truncation is not None
            if truncation is None:
                truncation = energy_truncation(matrix, self.energy)
                self.svd_calls += 1
            self._truncations[name] = truncation
            layer.weight.copy_(truncation.weight().reshape(layer.weight.shape))
        return True

    @torch.no_grad()
    def add_nuclear_subgradient(self) -> None:
        """After the backward: on projection steps, add ``λ U Vᵀ`` to each layer's gradient."""
        if not self._projected_now or self.nuclear_weight == 0.0:
            return
        for name, layer in self.layers.items():
            if layer.weight.grad is None:
                continue
            subgradient = self._truncations[name].subgradient().reshape(layer.weight.shape)
            layer.weight.grad.add_(subgradient, alpha=self.nuclear_weight)

    def ranks(self) -> dict[str, int]:
        """Each layer's rank at its last projection."""
        return {name: t.rank for name, t in self._truncations.items()}

    def finalize(
        self, *, energy: float | None = None, value_threshold: float | None = None
    ) -> list[LayerReport]:
        """Split every layer into two thin ones (in place) by truncated SVD, keeping the rank
        that holds ``energy`` (default: the training energy) or, with ``value_threshold``, the
        singular values above it (the paper's channel scheme uses 0.05)."""
        reports = []
        for name, layer in self.layers.items():
            module, report = split_layer(
                layer, energy=energy or self.energy, value_threshold=value_threshold, name=name
            )
            replace_module(self.model, name, module)
            reports.append(report)
        return reports


def matrix_view(weight: torch.Tensor) -> torch.Tensor:
    """The matrix TRP truncates: the weight itself, or ``N × (C·k_h·k_w)`` for a convolution."""
    return weight.reshape(weight.shape[0], -1)


@torch.no_grad()
def split_layer(
    layer: Prunable, *, energy: float = 0.9, value_threshold: float | None = None, name: str = ""
) -> tuple[nn.Module, LayerReport]:
    """Two thin layers computing ``layer`` with its weight truncated by SVD.

    Linear ``(m, n)`` → :class:`~lorsum.compression.LowRankLinear` (``down: n → k``, ``up: k → m``
    with the bias, as LoRD builds it);
    Conv2d ``N × C × k_h × k_w`` → ``Conv2d(C → k, same kernel, stride, padding, dilation, no
    bias)`` then ``Conv2d(k → N, 1 × 1)`` with the bias. Singular values are split evenly
    (``√σ`` on each side).
    """
    matrix = matrix_view(layer.weight)
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    if value_threshold is not None:
        k = max(1, int((value_threshold < S).sum()))
    else:
        k = energy_rank(S.square(), energy)
    root = S[:k].sqrt()
    down = (root[:, None] * Vh[:k]).to(matrix.dtype)  # (k, n)
    up = (U[:, :k] * root).to(matrix.dtype)  # (m, k)
    if isinstance(layer, nn.Linear):  # the same layer LoRD builds
        bias = None if layer.bias is None else layer.bias.detach()
        module: nn.Module = LowRankLinear.from_factors(down, up, bias)
    else:
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        first = nn.Conv2d(
            layer.in_channels, k, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, bias=False, **factory,
        )  # fmt: skip
        second = nn.Conv2d(k, layer.out_channels, 1, bias=layer.bias is not None, **factory)
        first.weight.copy_(down.reshape(k, *layer.weight.shape[1:]))
        second.weight.copy_(up[:, :, None, None])
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
        module = nn.Sequential(first, second)
    report = LayerReport(
        name=name, shape=tuple(matrix.shape), rank=k,
        parameters_before=sum(p.numel() for p in layer.parameters()),
        parameters_after=sum(p.numel() for p in module.parameters()),
    )  # fmt: skip
    return module, report
