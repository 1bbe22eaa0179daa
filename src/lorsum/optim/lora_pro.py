"""LoRA-Pro: LoRA gradients adjusted so that the adapter follows full fine-tuning's step projected
onto the tangent space of the rank-r matrices, with full m×n Adam moments (the paper) or SGD."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lorsum.capture import CapturedGradient
from lorsum.functional.linalg import default_compute_dtype
from lorsum.functional.lora_pro import lora_pro_adam, lora_pro_gradients
from lorsum.optim._base import (
    LoRAOptimizer,
    _check_betas,
    _check_choice,
    _check_non_negative,
    _check_positive,
)

__all__ = ["LoRAPro"]

_MODES = ("full_adam", "sgd")


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
        }
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, nonfinite=nonfinite)

    def _check_lora_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._check_lora_hyperparameters(group)
        _check_non_negative(group, "damping")
        _check_choice(group, "mode", _MODES)
        _check_betas(group)
        _check_positive(group, "eps")

    def _step_lora_group(
        self, group: dict[str, Any], A: Tensor, B: Tensor, captured: CapturedGradient | None
    ) -> None:
        if A.grad is None and B.grad is None:
            return
        grad_A = A.grad if A.grad is not None else torch.zeros_like(A)
        grad_B = B.grad if B.grad is not None else torch.zeros_like(B)
        state = self.state[B]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        state["step"] += 1
        dtype = self._compute_dtype(group) or default_compute_dtype(A, B)
        options = {"scaling": group["lora_scaling"], "damping": group["damping"]}
        lr = group["lr"]
        if group["mode"] == "full_adam":
            if "exp_avg" not in state:
                # Full m×n moments, keyed by B (the optimizer's only per-pair state slot).
                shape = (B.shape[0], A.shape[1])
                state["exp_avg"] = torch.zeros(shape, dtype=B.dtype, device=B.device)
                state["exp_avg_sq"] = torch.zeros(shape, dtype=B.dtype, device=B.device)
            M, V = state["exp_avg"], state["exp_avg_sq"]
            d_A, d_B, M_new, V_new = lora_pro_adam(
                A, B, grad_A, grad_B, M, V,
                step=float(state["step"]),  # a CPU tensor: no device sync
                betas=group["betas"], eps=group["eps"], compute_dtype=dtype, **options,
            )  # fmt: skip
            moments = [(M, M_new), (V, V_new)]
        else:
            d_A, d_B = lora_pro_gradients(A, B, grad_A, grad_B, compute_dtype=dtype, **options)
            moments = []
        # Decoupled decay of s·BA in W space: √(1 − η·wd) on each factor is (1 − η·wd) on BA.
        shrink = _sqrt_clamped(1.0 - lr * group["weight_decay"])
        A_new = (A - lr * d_A).mul_(shrink)
        B_new = (B - lr * d_B).mul_(shrink)
        # Moments are committed with the factors, so a non-finite step corrupts neither.
        self._commit_(state, [(B, B_new), (A, A_new), *moments])


def _sqrt_clamped(x: float | Tensor) -> float | Tensor:
    """``√max(x, 0)`` for a float or a 0-d tensor (a scheduled ``lr`` may be a tensor)."""
    if isinstance(x, Tensor):
        return x.clamp_min(0.0).sqrt()
    return math.sqrt(max(x, 0.0))
