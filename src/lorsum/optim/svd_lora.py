"""SVDLoRA: the full fine-tuning step, projected onto rank r by a truncated SVD."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lorsum.capture import CapturedGradient, GradientCapture
from lorsum.functional import (
    FactoredSum,
    balanced_factors,
    default_compute_dtype,
    randomized_svd,
    truncated_svd,
)
from lorsum.optim._base import (
    LoRAOptimizer,
    PairWork,
    _check_choice,
    _check_count,
    _check_fraction,
)

__all__ = ["SVDLoRA"]


class SVDLoRA(LoRAOptimizer):
    r"""SVDLoRA: take the full step on ``W``, then keep its best rank-r part.

    For every LoRA pair ``W = W0 + s·B A`` with captured full gradient ``G = ∂L/∂W``:

    .. math::

        M \leftarrow \beta M + G, \qquad
        s B' A' = \Pi_r\big((1 - \eta\,\mathrm{wd})\, s B A - \eta\, (G + \beta M_{t-1})\big)

    with ``Π_r`` the truncated SVD (Eckart–Young) and the new factors split evenly,
    ``B' = U Σ^½ / √s``, ``A' = Σ^½ Vᵀ / √s``. This is projected (heavy-ball) gradient descent on
    the rank-r matrices: the step LoRSum approaches with many sweeps and no damping, and the
    reference every LoRA optimizer is compared against.

    Cost, stated plainly: ``svd="exact"`` forms the ``m × n`` step and runs a full SVD,
    ``O(m n min(m, n))`` per layer per step. ``svd="randomized"`` runs a range finder on the
    factored step instead (``2·(power_iters + 1)`` products with ``r + oversamples`` vectors;
    nothing ``m × n`` is formed without momentum). ``momentum > 0`` keeps a dense ``m × n``
    momentum buffer per layer (``state[B]["momentum_buffer_dense"]``), as the reference does.

    Args:
        params: param groups from :func:`lorsum.pair_param_groups` (and dense groups).
        lr: ``η`` (default: 1e-3), an SGD learning rate on ``W``.
        momentum: ``β`` in ``[0, 1)`` (default: 0).
        weight_decay: decoupled weight decay on ``s·B A`` (default: 0).
        svd: ``"exact"`` (default) or ``"randomized"``.
        oversamples, power_iters: of the randomized range finder (defaults: 10 and 2).
        capture: the :class:`~lorsum.GradientCapture` recording every pair's full gradient.
        max_grad_norm: global clipping of the full gradients (see :class:`LoRAOptimizer`).
        nonfinite: ``"skip_pair"`` (default) or ``"skip_all"`` (see
            :class:`~lorsum.optim.LoRAOptimizer`).
        step_in_backward: step each pair inside ``backward()`` and free its captured rows at
            once (see :class:`LoRAOptimizer`; no gradient accumulation, no ``max_grad_norm``).
        backward_bucket: with ``step_in_backward``, pairs stepped together as one stacked
            step (default 1; see :class:`LoRAOptimizer`).
        process_group: ``"auto"`` (default), ``None`` or a ``ProcessGroup``: average the captured
            gradients over data-parallel ranks (see :class:`LoRAOptimizer` and
            ``docs/distributed.md``).

    Reference:
        The SVDLoRA baseline of "Beyond SGD, Without SVD", arXiv:2602.16456.
    """

    needs_capture = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        svd: str = "exact",
        oversamples: int = 10,
        power_iters: int = 2,
        capture: GradientCapture | None = None,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip_pair",
        step_in_backward: bool = False,
        backward_bucket: int = 1,
        process_group: Any = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "svd": svd,
            "oversamples": oversamples,
            "power_iters": power_iters,
        }
        super().__init__(
            params,
            defaults,
            capture=capture,
            max_grad_norm=max_grad_norm,
            nonfinite=nonfinite,
            step_in_backward=step_in_backward,
            backward_bucket=backward_bucket,
            process_group=process_group,
        )

    def _check_lora_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._check_lora_hyperparameters(group)
        _check_fraction(group, "momentum")
        _check_choice(group, "svd", ("exact", "randomized"))
        _check_count(group, "oversamples", minimum=0)
        _check_count(group, "power_iters", minimum=0)

    def _step_lora_groups(self, work: list[PairWork]) -> None:
        reducer = self.reducer
        if reducer is not None:
            # The SVD needs the global G itself: average the dense gradients (m·n per layer, one
            # collective for all of them), as DDP of the full weights would. The baseline pays
            # the dense cost anyway.
            self._average_dense_([c for _, _, _, c in work if c is not None], reducer)
        super()._step_lora_groups(work)

    def _step_lora_group(
        self, group: dict[str, Any], A: Tensor, B: Tensor, captured: CapturedGradient | None
    ) -> None:
        if captured is None:
            return
        state = self.state[B]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        lr, s, beta = group["lr"], group["lora_scaling"], group["momentum"]
        rank = A.shape[0]
        # The step in W units: (1 − η wd)·sBA − η·D, D = ∂L/∂W + β M (the capture holds s·∂L/∂W).
        terms: list[Any] = [(s * B, A), *captured.terms()]
        weights: list[Any] = [1.0 - lr * group["weight_decay"]]
        weights += [-lr / s] * (len(terms) - 1)
        updates: list[tuple[Tensor, Tensor]] = []
        if beta > 0:
            buffer = state.get("momentum_buffer_dense")
            gradient = captured.to_dense() / s
            new_buffer = gradient if buffer is None else buffer.to(gradient.dtype) * beta + gradient
            terms, weights = [(s * B, A), new_buffer], [weights[0], -lr]
            if buffer is None:
                state["momentum_buffer_dense"] = torch.zeros_like(new_buffer)
            updates.append((state["momentum_buffer_dense"], new_buffer))
        try:
            U, S, Vh = self._decompose(group, terms, weights, A, B, state)
        except torch.linalg.LinAlgError:
            # The SVD did not converge (a diverging or non-finite step): skip it, loudly counted.
            U = torch.full((B.shape[0], rank), float("nan"), dtype=B.dtype, device=B.device)
            S = torch.zeros(rank, dtype=B.dtype, device=B.device)
            Vh = torch.zeros(rank, A.shape[1], dtype=A.dtype, device=A.device)
        B_new, A_new = balanced_factors(U, S, Vh)
        if B_new.shape[1] < rank:  # a layer smaller than the rank: pad with zero directions
            B_new = torch.nn.functional.pad(B_new, (0, rank - B_new.shape[1]))
            A_new = torch.nn.functional.pad(A_new, (0, 0, 0, rank - A_new.shape[0]))
        root_s = s**0.5
        self._commit_(state, [(B, B_new / root_s), (A, A_new / root_s), *updates])
        state["step"] += 1

    @staticmethod
    def _decompose(
        group: dict[str, Any], terms: list[Any], weights: list[Any], A: Tensor, B: Tensor,
        state: dict[str, Any],
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Top-r SVD of the step: dense and exact, or randomized on the factored step."""
        shape, rank = (B.shape[0], A.shape[1]), A.shape[0]
        target = FactoredSum.from_terms(terms, weights, shape, dtype=default_compute_dtype(A, B))
        if group["svd"] == "exact":
            return truncated_svd(target.to_dense(), rank)
        generator = torch.Generator().manual_seed(int(state["step"].item()))
        return randomized_svd(
            target, rank, oversamples=group["oversamples"], power_iters=group["power_iters"],
            generator=generator,
        )  # fmt: skip
