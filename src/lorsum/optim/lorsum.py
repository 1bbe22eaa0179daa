"""LoRSum: the full fine-tuning step, projected onto rank r by alternating least squares."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from lorsum.capture import GradientCapture
from lorsum.functional import lorsum
from lorsum.optim._base import (
    LoRAOptimizer,
    PairWork,
    _check_bool,
    _check_count,
    _check_fraction,
    _check_non_negative,
    advance_steps,
)
from lorsum.optim._stacking import (
    STACK_LIMIT,
    Alone,
    captured_numel,
    captured_stack_key,
    group_stacks,
    stack,
    stack_terms,
)

__all__ = ["LoRSum"]


class LoRSum(LoRAOptimizer):
    r"""LoRSum: each step fits the adapter to the step full fine-tuning would take.

    For every LoRA pair ``W = W0 + s·B A`` with captured full gradient ``G = ∂L/∂W``, the new
    factors solve, by :func:`lorsum.functional.lorsum`,

    .. math::

        s B' A' \approx (1 - \eta\,\mathrm{wd})\, s B A - \eta\, D, \qquad
        D = G + \beta M_{t-1}

    where ``M`` is the low-rank momentum (``momentum = β > 0``): ``M_t ≈ β M_{t-1} + G`` at rank
    ``momentum_rank``, itself fitted by LoRSum from its previous factors (torch's SGD heavy-ball
    convention: dampening 0, ``M_1 = G_1``). In the exact limit (many sweeps, no damping,
    ``momentum_rank`` large enough) this is projected heavy-ball SGD on ``W``:
    ``W ← Π_r(W − η (β M + G))``.

    * ``num_iters = 0`` is the Riemannian / ScaledGD preconditioned step; ``1`` one alternating
      sweep; more sweeps approach SVDLoRA.
    * ``damping`` is the paper's ``lmbd``: the proximal weight on the factors is
      ``λ = damping · lr / s`` in the fit of ``B'A'``, i.e. it scales with the learning rate as in
      the paper (``λ = η · lmbd``), and with ``1/s`` so that the step, written in ``W``, does not
      depend on the LoRA scaling ``s``. The momentum fit uses ``λ_M = damping · lr``.
    * ``weight_decay`` is decoupled and acts on the adapter's update ``s·B A`` (``W0`` is frozen).
    * A pair whose layer saw no backward this step is left untouched. A step whose new factors
      are not all finite leaves them untouched and counts ``state[B]["skipped_steps"]``.

    Args:
        params: param groups from :func:`lorsum.pair_param_groups` (and
            :func:`lorsum.dense_param_group` for heads and biases).
        lr: ``η`` (default: 1e-3), an SGD learning rate on ``W``.
        num_iters: alternating sweeps per step, ``>= 0`` (default: 1).
        damping: ``lmbd >= 0`` (default: 1e-3, the paper's synthetic-task value).
        weight_decay: decoupled weight decay on ``s·B A`` (default: 0).
        momentum: ``β`` in ``[0, 1)`` (default: 0, no momentum buffer).
        momentum_rank: rank ``r'`` of the momentum buffer (default: ``None``, the pair's rank).
        compute_dtype: ``"float32"``, ``"float64"`` or ``None`` (default: at least float32).
        foreach: step pairs of equal shapes, dtypes and hyperparameters as one stack (default):
            one batched product and one batched r×r solve per half-step for all of them. It
            copies their captured gradients into one buffer per stack, so pairs whose captured
            gradient holds more than ``STACK_LIMIT`` (2²²) numbers are stepped alone; ``False``
            steps every pair alone.
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

    State: ``state[B]["step"]``, ``state[B]["skipped_steps"]``; with momentum the buffer's
    factors ``state[B]["momentum_buffer"] (m, r')`` and ``state[A]["momentum_buffer"] (r', n)``.

    Example:
        >>> pairs = lorsum.add_lora(model, ["fc1", "fc2"], rank=8)        # doctest: +SKIP
        >>> capture = lorsum.GradientCapture(pairs)                       # doctest: +SKIP
        >>> opt = LoRSum(lorsum.pair_param_groups(pairs), lr=0.1, capture=capture)  # doctest: +SKIP

    Reference:
        "Beyond SGD, Without SVD", arXiv:2602.16456 (PSI-LoRA; github.com/zeligism/PSI-LoRA @
        9cb3fa6). Departures: ``num_iters=0`` is the Jacobi step (a no-op there), the LoRA scale
        and gradient accumulation are handled exactly, and the full gradient includes the
        adapter's dropout mask (it is captured at the adapter's own maps).
    """

    needs_capture = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        *,
        num_iters: int = 1,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        momentum_rank: int | None = None,
        compute_dtype: str | None = None,
        foreach: bool = True,
        capture: GradientCapture | None = None,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip_pair",
        step_in_backward: bool = False,
        backward_bucket: int = 1,
        process_group: Any = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "num_iters": num_iters,
            "damping": damping,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "momentum_rank": momentum_rank,
            "compute_dtype": compute_dtype,
            "foreach": foreach,
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
        _check_non_negative(group, "damping")
        _check_count(group, "num_iters", minimum=0)
        _check_fraction(group, "momentum")
        _check_count(group, "momentum_rank", minimum=1, optional=True)
        _check_bool(group, "foreach")

    def _step_lora_groups(self, work: list[PairWork]) -> None:
        # Pairs that agree on shapes, dtypes, hyperparameters and the layout of their captured
        # gradient are stepped as one stack: one batched product and one batched r×r solve per
        # half-step for all of them, instead of a Python loop of small kernels per layer.
        for members in group_stacks(work, self._stack_of):
            self._step_stack(members)

    def _stack_of(self, item: PairWork) -> Hashable | None:
        group, A, B, captured = item
        if captured is None:
            return None
        stackable = group["foreach"] and captured_numel(captured) <= STACK_LIMIT
        return captured_stack_key(group, A, B, captured) if stackable else Alone(id(B))

    def _step_stack(self, members: list[PairWork]) -> None:
        group, As, Bs, states = self._open_stack(members)
        lr, s, beta = group["lr"], group["lora_scaling"], group["momentum"]
        # G_s = s·∂L/∂W per pair, as pairs (Sᵀ, X) or one dense matrix; stacked term by term.
        gradient = stack_terms([captured.terms() for _, _, _, captured in members])
        B, A = stack(Bs), stack(As)
        options: dict[str, Any] = {
            "num_iters": group["num_iters"],
            "compute_dtype": self._compute_dtype(group),
        }
        # Under DDP the gradient terms are this rank's share: every half-step averages their
        # products over the ranks (the stack's key holds `averaged`, so all members agree).
        reduce = self._reducer_for(members[0][3])  # type: ignore[arg-type]
        if reduce is not None:
            options["reduce"] = reduce
            options["local_terms"] = range(1, 1 + len(gradient))
        # In product units: B'A' ≈ (1 − η wd) BA − (η/s²) G_s − (η β/s) M, all ∂W-consistent.
        terms: list[Any] = [(B, A), *gradient]
        weights: list[Any] = [1.0 - lr * group["weight_decay"]] + [-lr / s**2] * len(gradient)
        if beta > 0:
            buffers = [self._low_rank_momentum(group, A_i, B_i) for _, A_i, B_i, _ in members]
            M_Bs, M_As = [M_B for M_B, _ in buffers], [M_A for _, M_A in buffers]
            M_B, M_A = stack(M_Bs), stack(M_As)
            terms.append((M_B, M_A))
            weights.append(-lr * beta / s)
        B_new, A_new = lorsum(terms, weights, (B, A), damping=group["damping"] * lr / s, **options)
        updates = [(Bs, B, B_new), (As, A, A_new)]
        if beta > 0:
            # M_t ≈ β M_{t-1} + ∂L/∂W, fitted from the previous momentum factors.
            M_B_new, M_A_new = lorsum(
                [(M_B, M_A), *gradient],
                [beta] + [1.0 / s] * len(gradient),
                (M_B, M_A),
                damping=group["damping"] * lr,
                **options,
            )
            updates += [(M_Bs, M_B, M_B_new), (M_As, M_A, M_A_new)]
        self._commit_stack_(states, updates)
        advance_steps(states)
