"""LoRA-Pro: LoRA gradients adjusted so that the adapter follows full fine-tuning's step projected
onto the tangent space of the rank-r matrices, with full m×n Adam moments (the paper) or SGD."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lorsum.functional.linalg import default_compute_dtype
from lorsum.functional.lora_pro import lora_pro_adam, lora_pro_gradients
from lorsum.optim._base import (
    LoRAOptimizer,
    PairWork,
    _check_betas,
    _check_bool,
    _check_choice,
    _check_non_negative,
    _check_positive,
    advance_steps,
)
from lorsum.optim._stacking import group_stacks, hyperparameter_key, split_by_size, stack

__all__ = ["LoRAPro"]

_MODES = ("full_adam", "sgd")

# In "full_adam" mode a stack of G pairs holds its m×n work for all members at once: copies of
# the moments M and V, g̃, the new moments and Δ (about six (G, m, n) buffers at the peak, in the
# compute dtype), where pairs stepped one by one hold one layer's worth at a time. A stack is
# therefore cut into chunks of at most this many m·n numbers in all (2²⁴: 64 MiB per buffer in
# float32, some 400 MiB of transients); a pair larger than that is stepped alone (a stack of one
# copies nothing). Layers that large keep the device busy on their own, and stacking them would
# only add the copies. "sgd" mode has factor-sized work only: its stacks are not bounded.
STACK_LIMIT = 2**24


class LoRAPro(LoRAOptimizer):
    r"""LoRA-Pro: step the factors so that ``W = W0 + s·B A`` moves like full fine-tuning would,
    projected onto the tangent space of the rank-r matrices at ``BA``.

    For each LoRA pair, the gradients ``∇_A = s BᵀG``, ``∇_B = s G Aᵀ`` (autograd's ``A.grad``,
    ``B.grad``; ``G = ∂L/∂W`` is never formed by the ``"sgd"`` mode) are replaced by the adjusted
    gradients of :func:`lorsum.functional.lora_pro_gradients`, whose first-order effect on ``W`` is

    .. math::

        \operatorname{Proj}_T(G) = P_B G + G P_A - P_B G P_A, \qquad
        P_B = B (B^T B + \delta I)^{-1} B^T,\ P_A = A^T (A A^T + \delta I)^{-1} A

    (the free ``r×r`` matrix ``X`` comes from the symmetric Sylvester equation, solved with
    ``eigh``: it keeps the adjusted gradients closest to the LoRA gradients).

    * ``mode="full_adam"`` (default, the paper's AdamW version): Adam runs in the m×n space on the
      equivalent gradient ``g̃ = Proj_T(G)``, with moments ``M``, ``V`` and the bias-corrected
      direction ``Δ = (M/(1−β₁ᵗ)) / (√V/√(1−β₂ᵗ) + ε)``; ``Δ`` is projected back onto the factors
      (:func:`lorsum.functional.lora_pro_adam`) and the factors take a plain SGD step,
      ``A ← A − η d_A``, ``B ← B − η d_B``, so ``W`` moves by ``−η Proj_T(Δ) + O(η²)``.
    * ``mode="sgd"``: no moments, ``A ← A − η g_A``, ``B ← B − η g_B``; ``W`` moves by
      ``−η Proj_T(G) + O(η²)``. ``η`` is then an SGD learning rate on ``W``, typically much larger
      than the Adam-like default below.

    Weight decay is decoupled and acts in ``W`` space on the adapter ``s·BA`` (``W0`` is frozen),
    as in :class:`lorsum.LoRSum`: after the step both factors are multiplied by
    ``√(1 − η·wd)``, so the adapter product is exactly ``(1 − η·wd)`` times what it would be
    without decay (clamped at 0 if ``η·wd > 1``). Decay on ``A`` and ``B`` separately would instead
    shrink ``BA`` by ``(1 − η·wd)²`` and depend on how the product is split between the factors.

    **Memory.** ``"full_adam"`` keeps ``state[B]["exp_avg"]`` and ``state[B]["exp_avg_sq"]`` of
    shape ``(m, n)`` per adapted layer, in the factors' dtype (as ``torch.optim.Adam`` does, and as
    torch's ``load_state_dict`` casts them): ``8·m·n`` bytes per layer in float32, as much as full
    fine-tuning's Adam state. Each step also allocates a few transient m×n buffers (``g̃``, the
    new moments, ``Δ``) and costs ``O(m n r)``. ``"sgd"`` keeps no m×n state and costs
    ``O((m + n) r² + r³)`` per layer.

    **Stacks.** With ``foreach=True`` pairs that agree on the shapes, dtypes and device of their
    factors, on every hyperparameter (``lora_scaling`` included), on which gradients they have
    and (in ``"full_adam"`` mode, for the bias correction) on their Adam count ``t`` (a pair that
    missed a step has a lower one) are stepped as one stack ``(G, …)``: one batched kernel per
    operation (Grams, ``eigh``, Cholesky, the Sylvester solve, the m×n Adam update) instead of a
    Python loop of small kernels per layer. In ``"full_adam"`` mode a stack holds at most
    ``STACK_LIMIT`` (2²⁴) m·n numbers, since its m×n temporaries exist for all members at once.
    Each member gives what it would alone, up to rounding (the batched kernels sum in another
    order); a stack of one (every pair with ``foreach=False``) runs the unbatched math.

    Gradients: a pair whose ``A.grad`` and ``B.grad`` are both ``None`` is skipped; if only one is
    ``None`` it counts as zero (both factors still move: the adjustment mixes them). Gradient
    clipping (``max_grad_norm``) uses the raw LoRA gradients, before the adjustment, as the
    official code does. A step whose new factors or moments are not all finite leaves them
    untouched and counts ``state[B]["skipped_steps"]``; ``state[B]["step"]`` still advances.

    Args:
        params: param groups from :func:`lorsum.pair_param_groups` (and
            :func:`lorsum.dense_param_group` for heads and biases).
        lr: ``η`` (default: 2e-5, the official runs' value: in ``"full_adam"`` mode the step is
            an Adam step on ``W``, so full fine-tuning learning rates apply).
        mode: ``"full_adam"`` (default) or ``"sgd"``.
        betas: Adam's ``(β₁, β₂)``, each in ``[0, 1)`` (default: (0.9, 0.999)).
        eps: Adam's ``ε > 0`` (default: 1e-8).
        damping: ``δ >= 0`` added to ``BᵀB`` and ``AAᵀ`` and regularising ``X`` (default: 1e-8,
            the official value). It is what makes ``B = 0`` (PEFT's init) legal; ``δ = 0`` needs
            full-rank factors, or the step is skipped as non-finite. In float32 it only tames
            directions whose Gram eigenvalue is above about ``ε₃₂·‖BᵀB‖``: for nearly
            rank-deficient factors raise it or use ``compute_dtype="float64"``.
        weight_decay: decoupled decay of ``s·BA`` in ``W`` space (default: 0, as the official
            runs).
        compute_dtype: ``"float32"``, ``"float64"`` or ``None`` (default: the factors' dtype, at
            least float32). In ``"full_adam"`` mode it also sets the dtype of the m×n work.
        max_grad_norm: global clipping of the raw gradients (see :class:`LoRAOptimizer`).
        foreach: step same-shape pairs as stacks (default: True, see **Stacks** above);
            ``False`` steps every pair alone.
        nonfinite: ``"skip_pair"`` (default) or ``"skip_all"`` (see
            :class:`~lorsum.optim.LoRAOptimizer`).

    State: ``state[B]["step"]`` (0-d float32 CPU tensor, the Adam ``t``),
    ``state[B]["skipped_steps"]``, and in ``"full_adam"`` mode ``state[B]["exp_avg"] (m, n)``
    and ``state[B]["exp_avg_sq"] (m, n)``.

    .. note::
        Departures from the official code: the Adam counter is the standard ``t = 1, 2, …`` (the
        official counter runs one ahead, so its first step is ``≈ 0.745·sign(g̃)`` rather than
        ``≈ sign(g̃)``); the Sylvester equation is solved with real ``eigh``, not complex ``eig``
        and inverses; ``X`` is regularised by ``δ‖X‖²`` so rank-deficient factors stay finite; the
        LoRA scale is read per pair instead of being fixed to 2; pairs are explicit param groups
        instead of alternating parameters; and it runs under any trainer, without DeepSpeed.

    Example:
        >>> pairs = lorsum.add_lora(model, ["fc1", "fc2"], rank=8, alpha=16)   # doctest: +SKIP
        >>> opt = LoRAPro(lorsum.pair_param_groups(pairs), lr=2e-5)           # doctest: +SKIP
        >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()      # doctest: +SKIP

    Reference:
        Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", arXiv:2407.18242
        (ICLR 2025); official code github.com/mrflogs/LoRA-Pro @ fe26027.
    """

    needs_capture = False

    def __init__(
        self,
        params: Any,
        lr: float = 2e-5,
        *,
        mode: str = "full_adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        damping: float = 1e-8,
        weight_decay: float = 0.0,
        compute_dtype: str | None = None,
        max_grad_norm: float | None = None,
        foreach: bool = True,
        nonfinite: str = "skip_pair",
    ) -> None:
        defaults = {
            "lr": lr,
            "mode": mode,
            "betas": betas,
            "eps": eps,
            "damping": damping,
            "weight_decay": weight_decay,
            "compute_dtype": compute_dtype,
            "foreach": foreach,
        }
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, nonfinite=nonfinite)

    def _check_lora_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._check_lora_hyperparameters(group)
        _check_non_negative(group, "damping")
        _check_choice(group, "mode", _MODES)
        _check_betas(group)
        _check_positive(group, "eps")
        _check_bool(group, "foreach")

    def _step_lora_groups(self, work: list[PairWork]) -> None:
        # Pairs that agree on everything the math branches or broadcasts on are stepped as one
        # stack: one batched kernel per operation for all of them, instead of a Python loop of
        # tiny r×r kernels per layer.
        def key(item: PairWork) -> Any:
            group, A, B, _ = item
            if A.grad is None and B.grad is None:
                return None
            return self._stack_key(group, A, B) if group["foreach"] else id(B)

        for members in group_stacks(work, key):
            if members[0][0]["mode"] == "full_adam":
                chunks = split_by_size(members, _moment_numel, STACK_LIMIT)
            else:
                chunks = [members]
            for chunk in chunks:
                self._step_stack(chunk)

    def _stack_key(self, group: dict[str, Any], A: Tensor, B: Tensor) -> Any:
        """Pairs with equal keys can be stepped as one stack."""
        state = self.state[B]
        # "sgd" mode has neither an Adam count nor moments.
        t: float | None = None
        moments: tuple[torch.dtype, torch.dtype] | None = None
        if group["mode"] == "full_adam":
            # The Adam count t of this step, shared by the stack (bias correction depends on
            # it). A 0-d CPU tensor, as in torch's Adam: reading it does not wait for the device.
            t = float(state["step"]) + 1 if "step" in state else 1.0
            # Loaded moments keep the dtype they were saved in, which may not be B's.
            if "exp_avg" in state:
                moments = (state["exp_avg"].dtype, state["exp_avg_sq"].dtype)
            else:
                moments = (B.dtype, B.dtype)
        return (
            (tuple(A.shape), tuple(B.shape), A.dtype, B.dtype, A.device, B.device, moments),
            (A.grad is not None, B.grad is not None, t),
            hyperparameter_key(group),
        )

    def _step_stack(self, members: list[PairWork]) -> None:
        group, As, Bs, states = self._open_stack(members)
        advance_steps(states)
        # Stacks are (G, …) tensors (views of the pair's own for G = 1). A stack of one gives
        # the functional core its 2-d member, so foreach=False is the unbatched step exactly.
        single = len(members) == 1

        def unstacked(x: Tensor) -> Tensor:  # (G, …) -> what the math is given
            return x[0] if single else x

        def restacked(x: Tensor) -> Tensor:  # the math's result -> (G, …) for the commit
            return x.unsqueeze(0) if single else x

        A, B = stack(As), stack(Bs)
        grad_A = stack([a.grad if a.grad is not None else torch.zeros_like(a) for a in As])
        grad_B = stack([b.grad if b.grad is not None else torch.zeros_like(b) for b in Bs])
        dtype = self._compute_dtype(group) or default_compute_dtype(As[0], Bs[0])
        options = {"scaling": group["lora_scaling"], "damping": group["damping"]}
        lr = group["lr"]
        factors = (unstacked(A), unstacked(B), unstacked(grad_A), unstacked(grad_B))
        moments: list[tuple[list[Tensor], Tensor, Tensor]] = []
        if group["mode"] == "full_adam":
            for state, A_i, B_i in zip(states, As, Bs, strict=True):
                if "exp_avg" not in state:
                    # Full m×n moments, keyed by B (the optimizer's only per-pair state slot).
                    shape = (B_i.shape[0], A_i.shape[1])
                    state["exp_avg"] = torch.zeros(shape, dtype=B_i.dtype, device=B_i.device)
                    state["exp_avg_sq"] = torch.zeros(shape, dtype=B_i.dtype, device=B_i.device)
            Ms = [state["exp_avg"] for state in states]
            Vs = [state["exp_avg_sq"] for state in states]
            M, V = stack(Ms), stack(Vs)
            d_A, d_B, M_new, V_new = lora_pro_adam(
                *factors, unstacked(M), unstacked(V),
                step=float(states[0]["step"]),  # a CPU tensor, the same for the whole stack
                betas=group["betas"], eps=group["eps"], compute_dtype=dtype, **options,
            )  # fmt: skip
            moments = [(Ms, M, restacked(M_new)), (Vs, V, restacked(V_new))]
        else:
            d_A, d_B = lora_pro_gradients(*factors, compute_dtype=dtype, **options)
        # Decoupled decay of s·BA in W space: √(1 − η·wd) on each factor is (1 − η·wd) on BA.
        shrink = _sqrt_clamped(1.0 - lr * group["weight_decay"])
        A_new = (A - lr * restacked(d_A)).mul_(shrink)
        B_new = (B - lr * restacked(d_B)).mul_(shrink)
        # Moments are committed with the factors, so a non-finite step corrupts neither; in a
        # stack, each pair keeps or takes its own values.
        self._commit_stack_(states, [(Bs, B, B_new), (As, A, A_new), *moments])


def _moment_numel(item: PairWork) -> int:
    """The m·n numbers of one of a pair's m×n buffers: what a stack's memory grows by."""
    _, A, B, _ = item
    return B.shape[0] * A.shape[1]


def _sqrt_clamped(x: float | Tensor) -> float | Tensor:
    """``√max(x, 0)`` for a float or a 0-d tensor (a scheduled ``lr`` may be a tensor)."""
    if isinstance(x, Tensor):
        return x.clamp_min(0.0).sqrt()
    return math.sqrt(max(x, 0.0))
