"""SVDLoRA: the full fine-tuning step, projected onto rank r by a truncated SVD."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from lorsum.capture import GradientCapture
from lorsum.functional import (
    FactoredSum,
    balanced_factors,
    default_compute_dtype,
    gram_truncated_svd,
    randomized_svd,
    truncated_svd,
)
from lorsum.optim._base import (
    LoRAOptimizer,
    PairWork,
    _check_bool,
    _check_choice,
    _check_count,
    _check_fraction,
    advance_steps,
)
from lorsum.optim._stacking import (
    STACK_LIMIT,
    Alone,
    captured_stack_key,
    group_stacks,
    split_by_size,
    stack,
    stack_terms,
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
    ``O(m n min(m, n))`` per layer per step. ``svd="gram"`` forms it too and takes the same exact
    top-r triplets from the eigendecomposition of its smaller Gram matrix in float64 (see
    :func:`~lorsum.functional.gram_truncated_svd`): the same order of arithmetic, but an
    eigendecomposition of ``min(m, n)²`` in place of an SVD of ``m × n``. ``svd="randomized"``
    runs a range finder on the factored step instead (``2·(power_iters + 1)`` products with
    ``r + oversamples`` vectors; nothing ``m × n`` is formed without momentum). ``momentum > 0``
    keeps a dense ``m × n`` momentum buffer per layer (``state[B]["momentum_buffer_dense"]``),
    as the reference does.

    Args:
        params: param groups from :func:`lorsum.pair_param_groups` (and dense groups).
        lr: ``η`` (default: 1e-3), an SGD learning rate on ``W``.
        momentum: ``β`` in ``[0, 1)`` (default: 0).
        weight_decay: decoupled weight decay on ``s·B A`` (default: 0).
        svd: ``"exact"`` (default), ``"gram"`` (exact too, through the float64 Gram matrix;
            not on MPS, which has no float64) or ``"randomized"``.
        oversamples, power_iters: of the randomized range finder (defaults: 10 and 2).
        foreach: step pairs of equal shapes, dtypes and hyperparameters as one stack
            (default: True): their steps go through one batched SVD (``"exact"``), one batched
            eigendecomposition (``"gram"``) or one batched range finder (``"randomized"``,
            whose stacks also share a step count, the probes' seed). A stack is cut where its
            members' ``m × n`` steps pass ``2**22`` numbers (16 MiB in float32). ``False``
            steps pair by pair.
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
            "momentum": momentum,
            "weight_decay": weight_decay,
            "svd": svd,
            "oversamples": oversamples,
            "power_iters": power_iters,
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
        _check_fraction(group, "momentum")
        _check_choice(group, "svd", ("exact", "gram", "randomized"))
        _check_count(group, "oversamples", minimum=0)
        _check_count(group, "power_iters", minimum=0)
        _check_bool(group, "foreach")

    def _step_lora_groups(self, work: list[PairWork]) -> None:
        reducer = self.reducer
        if reducer is not None:
            # The SVD needs the global G itself: average the dense gradients (m·n per layer, one
            # collective for all of them), as DDP of the full weights would. The baseline pays
            # the dense cost anyway.
            self._average_dense_([c for _, _, _, c in work if c is not None], reducer)
        # Same-shape pairs are stepped as one stack: one batched SVD for all of them. On a GPU
        # each SVD call is a launch and a wait for the solver's status; a model's 24 to 60
        # adapters paid both per layer. Each member adds its m×n step (and momentum) to what
        # the stack holds at once, so a stack is cut where those pass STACK_LIMIT numbers.
        for members in group_stacks(work, self._stack_of):
            for chunk in split_by_size(members, _dense_numel, STACK_LIMIT):
                self._step_stack(chunk)

    def _stack_of(self, item: PairWork) -> Hashable | None:
        group, A, B, captured = item
        if captured is None:
            return None
        if not group["foreach"]:
            return Alone(id(B))
        state = self.state[B]
        # A pair without its momentum buffer yet (its first step) is stacked apart.
        buffer = state.get("momentum_buffer_dense")
        momentum = None if buffer is None else buffer.dtype
        # The randomized SVD's probes are seeded by the step count: a stack shares one count.
        count = _step_count(state) if group["svd"] == "randomized" else None
        return captured_stack_key(group, A, B, captured), momentum, count

    def _step_stack(self, members: list[PairWork]) -> None:
        group, As, Bs, states = self._open_stack(members)
        lr, s, beta = group["lr"], group["lora_scaling"], group["momentum"]
        rank, shape, batch = As[0].shape[0], (Bs[0].shape[0], As[0].shape[1]), (len(members),)
        B, A = stack(Bs), stack(As)
        # The capture holds s·∂L/∂W per pair, as rows (Sᵀ, X) or dense; stacked term by term.
        gradient = stack_terms([captured.terms() for _, _, _, captured in members])
        # The step in W units: (1 − η wd)·sBA − η·D, with D = ∂L/∂W + β M.
        terms: list[Any] = [(s * B, A), *gradient]
        weights: list[Any] = [1.0 - lr * group["weight_decay"]] + [-lr / s] * len(gradient)
        updates: list[tuple[list[Tensor], Tensor, Tensor]] = []
        if beta > 0:
            dense = FactoredSum.from_terms(
                gradient, [1.0 / s] * len(gradient), shape, batch=batch,
                dtype=default_compute_dtype(*_tensors(gradient)),
            ).to_dense()  # fmt: skip
            buffers = [state.get("momentum_buffer_dense") for state in states]
            if buffers[0] is None:  # the first step: M = ∂L/∂W (the stack's key: all or none)
                new_buffer = dense
                buffers = [torch.zeros_like(d) for d in dense.unbind(0)]
                for state, buffer in zip(states, buffers, strict=True):
                    state["momentum_buffer_dense"] = buffer
            else:
                new_buffer = stack(buffers).to(dense.dtype) * beta + dense
            terms, weights = [(s * B, A), new_buffer], [weights[0], -lr]
            updates.append((buffers, stack(buffers), new_buffer))
        dtype = default_compute_dtype(As[0], Bs[0])
        steps = FactoredSum.from_terms(terms, weights, shape, batch=batch, dtype=dtype)
        if group["svd"] == "exact":
            U, S, Vh = _stacked_svds(lambda T: truncated_svd(T.to_dense(), rank), steps, rank)
        elif group["svd"] == "gram":
            U, S, Vh = _stacked_svds(lambda T: gram_truncated_svd(T.to_dense(), rank), steps, rank)
        else:  # the range finder on the factored steps, seeded by the stack's step count
            seed = _step_count(states[0])
            U, S, Vh = _stacked_svds(lambda T: _randomized(group, T, rank, seed), steps, rank)
        B_new, A_new = balanced_factors(U, S, Vh)
        if B_new.shape[-1] < rank:  # a layer smaller than the rank: pad with zero directions
            B_new = torch.nn.functional.pad(B_new, (0, rank - B_new.shape[-1]))
            A_new = torch.nn.functional.pad(A_new, (0, 0, 0, rank - A_new.shape[-2]))
        root_s = s**0.5
        self._commit_stack_(states, [(Bs, B, B_new / root_s), (As, A, A_new / root_s), *updates])
        advance_steps(states)


def _stacked_svds(
    decompose: Callable[[FactoredSum], tuple[Tensor, Tensor, Tensor]], steps: FactoredSum, rank: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r SVD of each step of a stack: ``U (G, m, k)``, ``S (G, k)``, ``Vh (G, k, n)``.

    ``decompose`` takes the whole stack in one batched call. A member whose SVD does not
    converge (a diverging or non-finite step) fails that call; the members are then decomposed
    one by one, and a failed one gets NaN directions, which the commit skips and counts, alone.
    """
    try:
        return decompose(steps)
    except torch.linalg.LinAlgError:
        triplets = [_svd_or_nan(decompose, member, rank) for member in _members(steps)]
    U, S, Vh = (torch.cat(parts) for parts in zip(*triplets, strict=True))
    return U, S, Vh


def _svd_or_nan(
    decompose: Callable[[FactoredSum], tuple[Tensor, Tensor, Tensor]],
    member: FactoredSum,
    rank: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``decompose`` of a stack of one member, or NaN directions if its SVD fails."""
    try:
        return decompose(member)
    except torch.linalg.LinAlgError:
        (m, n), k = member.shape, min(rank, *member.shape)
        like = member.pairs[0][1]  # s·B, every step's first term: the step's dtype and device
        return like.new_full((1, m, k), float("nan")), like.new_zeros(1, k), like.new_zeros(1, k, n)


def _randomized(
    group: dict[str, Any], steps: FactoredSum, rank: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The range finder's top-r SVD of a stack of factored steps; its probes are seeded by the
    pairs' step count, so a resumed run, or the same pair stepped alone, draws the same ones."""
    generator = torch.Generator().manual_seed(seed)
    return randomized_svd(
        steps, rank, oversamples=group["oversamples"], power_iters=group["power_iters"],
        generator=generator,
    )  # fmt: skip


def _members(steps: FactoredSum) -> list[FactoredSum]:
    """Each member of a stack of sums, as a stack of one."""
    return [
        FactoredSum(
            tuple((w, P[i : i + 1], Q[i : i + 1]) for w, P, Q in steps.pairs),
            tuple((w, D[i : i + 1]) for w, D in steps.dense),
            steps.shape,
            (1,),
        )
        for i in range(steps.batch[0])
    ]


def _step_count(state: dict[str, Any]) -> int:
    """The pair's steps so far (a 0-d CPU tensor: reading it does not wait for a device)."""
    return int(state["step"]) if "step" in state else 0


def _dense_numel(item: PairWork) -> int:
    """The m·n numbers of a pair's dense step: what a stack's memory grows by per member."""
    _, A, B, _ = item
    return B.shape[0] * A.shape[1]


def _tensors(terms: list[Any]) -> list[Tensor]:
    return [t for term in terms for t in (term if isinstance(term, tuple) else (term,))]
