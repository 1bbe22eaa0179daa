"""Capture the full-weight gradient of each LoRA layer in factored form, ``G = Sᵀ X``.

LoRSum, its scaled variant and SVDLoRA step with the gradient of the whole weight, which autograd
never forms for a LoRA layer. :class:`GradientCapture` records it as rows: the input ``X`` of the
adapter's down map (after dropout) and the gradient ``S`` at the output of its up map (which
already carries the LoRA scaling), so that ``SᵀX = s · ∂L/∂W`` with exactly autograd's dropout
mask, and ``A.grad = Bᵀ(SᵀX)``, ``B.grad = (SᵀX)Aᵀ``.

Design (why it is built this way):

* **An explicit object that owns its hooks**: a context manager with :meth:`remove`; nothing is
  written onto the modules and no optimizer registers hooks behind the user's back.
* **Rows are recorded at backward time.** A forward hook on the down map remembers its input;
  a forward hook on the up map attaches a tensor hook to its output, which fires only if that
  output is really back-propagated. So evaluation forwards, ``no_grad`` forwards and the first
  pass of gradient checkpointing (whose outputs are never differentiated) record nothing, and
  checkpointing gives the same rows as no checkpointing. Training with the model in ``eval()``
  mode (dropout off) is recorded like any other differentiated forward.
* **A window is the life of ``.grad``.** Micro-batches between two optimizer steps are summed
  exactly (the Trainer already scales each micro-batch loss). If a backward has finished into the
  buffer (seen by a post-accumulate-grad hook on ``B``) and a later backward finds ``B.grad`` set
  to ``None``, gradients were zeroed without a step (for example a step skipped by
  ``GradScaler`` after an overflow), and the stale rows are dropped. Within one backward, a layer
  called several times records every call (``B.grad`` is only written once they are all in).
* **Memory is bounded by** ``min(N (m + n), m n)`` elements per layer: rows are kept while they
  are the smaller form; past that they are folded into a dense float32 accumulator. Folding
  costs ``2 N m n`` flops, the price of the weight gradient itself, far above a sweep's
  ``4 r N (m + n)``: an optimizer that consumes each layer's rows as soon as they are complete
  (``step_in_backward``) sets ``fold = False``, since its rows never outlive one layer's
  backward anyway.
* **A layer's gradient is complete when its down factor's gradient is.** Backward reaches the
  up map before the down map, and autograd sums every call of a layer before it accumulates
  ``A.grad``, so :meth:`GradientCapture.on_complete` hooks ``A``'s gradient accumulation: at
  that moment the layer's rows are all in and autograd no longer needs ``A`` or ``B``. This is
  what lets an optimizer step each layer inside the backward pass and free its rows at once.
  With ``factor_grads=False`` there is no ``A.grad`` to accumulate: each call of the layer then
  hooks the gradient of the down map's input (or, when that input needs none, of the down map's
  output), which autograd forms right after the down map's own backward, and the layer is
  complete when every call of its forward has reached that point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lorsum.lora import LoRAPair

__all__ = ["CapturedGradient", "GradientCapture"]

Statistics = Literal["diagonal", "dense"] | None


@dataclass
class CapturedGradient:
    """The factored gradient ``G = Σ_i S_iᵀ X_i (+ D)`` of one layer over one step window.

    ``G`` here is ``s · ∂L/∂W``: the gradient of the loss with respect to the product ``B A``
    (see the module docstring). Exactly one of the two forms is populated.

    Attributes:
        rows: ``[(S_i (N_i, m), X_i (N_i, n))]`` while the rows are the smaller form.
        dense: ``D (m, n)`` float32 once the rows were folded.
        num_rows: ``N = Σ_i N_i``, every row seen in the window.
        input_sq_sum: ``Σ_t x_t ∘ x_t`` (n,) when diagonal statistics were requested.
        output_grad_sq_sum: ``Σ_t s_t ∘ s_t`` (m,), likewise.
        input_gram: ``XᵀX`` (n, n) when dense statistics were requested.
        output_grad_gram: ``SᵀS`` (m, m), likewise.
        averaged: ``dense`` is already the mean over the data-parallel ranks (set by a
            distributed optimizer step); otherwise the gradient is this process's own.
        global_num_rows: ``Σ_k N_k`` over the ranks as a 0-d tensor, once a distributed step has
            reduced it (``None`` before, or on one process).
    """

    rows: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    dense: Tensor | None = None
    num_rows: int = 0
    input_sq_sum: Tensor | None = None
    output_grad_sq_sum: Tensor | None = None
    input_gram: Tensor | None = None
    output_grad_gram: Tensor | None = None
    averaged: bool = False
    global_num_rows: Tensor | None = None

    def terms(self) -> list[Any]:
        """The gradient as :func:`lorsum.functional.lorsum` terms: pairs ``(Sᵀ, X)`` or ``D``."""
        if self.dense is not None:
            return [self.dense]
        return [(S.mT, X) for S, X in self.rows]

    def to_dense(self) -> Tensor:
        """``G (m, n)`` in float32 (forms it if the rows are kept; for dense baselines only)."""
        if self.dense is not None:
            return self.dense
        S0, X0 = self.rows[0]
        out = torch.zeros(S0.shape[1], X0.shape[1], dtype=_accumulate_dtype(S0), device=S0.device)
        for S, X in self.rows:
            _add_product_(out, S, X)
        return out

    def squared_norm(self) -> Tensor:
        """``‖G‖_F²`` as a 0-d float32 tensor, never forming ``G`` from rows.

        From rows it is ``⟨XXᵀ, SSᵀ⟩`` over all rows, ``O(N² (m + n))``; the capture keeps rows
        only while ``N (m + n) <= m n``, where this is at most the cost of forming ``G``.
        """
        if self.dense is not None:
            return self.dense.square().sum()
        dtype = _accumulate_dtype(self.rows[0][0])
        S = torch.cat([S.to(dtype) for S, _ in self.rows])
        X = torch.cat([X.to(dtype) for _, X in self.rows])
        return ((S @ S.mT) * (X @ X.mT)).sum()

    def scale_(self, factor: float | Tensor) -> CapturedGradient:
        """Multiply ``G`` by ``factor`` in place (the output-gradient side carries it)."""
        if self.dense is not None:
            self.dense.mul_(factor)
        self.rows = [(S * factor, X) for S, X in self.rows]
        factor_sq = factor * factor
        for name in ("output_grad_sq_sum", "output_grad_gram"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value * factor_sq)
        return self


class GradientCapture:
    """Record each LoRA layer's full-weight gradient as rows ``(S, X)`` until the optimizer step.

    Args:
        pairs: the adapters to capture; each needs ``modules = (down, up)`` (set by
            :func:`lorsum.add_lora`, :func:`lorsum.lora_pairs` and the PEFT integration).
        grad_scaler: a ``torch.amp.GradScaler`` whose loss scale the captured output-gradients
            carry; :meth:`pop` divides it out, as ``GradScaler.unscale_`` does for ``.grad``.
        statistics: also accumulate the metric statistics of scaled LoRSum: ``"diagonal"``
            (``Σx²``, ``Σs²``) or ``"dense"`` (``XᵀX``, ``SᵀS``); ``None`` (default) for neither.
        fold: fold a layer's rows into a dense ``m × n`` accumulator once that is smaller
            (default), bounding memory by ``min(N (m + n), m n)`` per layer; ``False`` always
            keeps the rows (for a consumer that takes them at once, see the module docstring).
            An attribute: it can be changed later, and applies from the next recorded rows.
        factor_grads: let autograd compute ``A.grad`` and ``B.grad`` as usual (default).
            ``False`` freezes the factors for autograd until :meth:`remove`, which saves their
            products and accumulations in every backward (see the module docstring); for the
            optimizers that step from the captured gradient only (LoRSum, ScaledLoRSum,
            SVDLoRA), without a ``grad_scaler`` (``GradScaler`` finds overflows in ``.grad``);
            ``step_in_backward`` works with it (see :meth:`on_complete`). With reentrant activation
            checkpointing, make the checkpointed blocks' inputs require grad (transformers:
            ``model.enable_input_require_grads()``), since no parameter inside does.

    Use it as a context manager, or call :meth:`remove` when done::

        with GradientCapture(pairs) as capture:
            optimizer = LoRSum(pair_param_groups(pairs), capture=capture)
            ...

    Raises:
        ValueError: a pair without modules, duplicated pairs, an unknown ``statistics``, or
            ``factor_grads=False`` with a ``grad_scaler``.
    """

    def __init__(
        self,
        pairs: Sequence[LoRAPair],
        *,
        grad_scaler: Any | None = None,
        statistics: Statistics = None,
        fold: bool = True,
        factor_grads: bool = True,
    ) -> None:
        for flag, value in (("fold", fold), ("factor_grads", factor_grads)):
            if not isinstance(value, bool):
                raise ValueError(f"Invalid {flag}: {value!r} (must be True or False)")
        if not factor_grads and grad_scaler is not None:
            raise ValueError(
                "factor_grads=False with a grad_scaler: GradScaler looks for overflows in .grad, "
                "which the LoRA factors no longer get; use bf16 autocast (no loss scaling) or "
                "factor_grads=True"
            )
        if statistics not in (None, "diagonal", "dense"):
            raise ValueError(
                f"Invalid statistics: {statistics!r} (must be None, 'diagonal' or 'dense')"
            )
        if not pairs:
            raise ValueError("no LoRA pairs given: nothing to capture")
        self.grad_scaler = grad_scaler
        self.statistics: Statistics = statistics
        self.fold = fold
        self.factor_grads = factor_grads
        self._sites: dict[nn.Parameter, _Site] = {}
        self._handles: list[Any] = []
        for pair in pairs:
            if pair.modules is None:
                raise ValueError(
                    f"LoRA pair {pair.name!r} has no (down, up) modules to hook; build pairs "
                    "with lorsum.add_lora, lorsum.lora_pairs or the PEFT integration"
                )
            if pair.B in self._sites:
                raise ValueError(f"LoRA pair {pair.name!r} is given twice")
            if not (pair.A.requires_grad and pair.B.requires_grad):
                raise ValueError(
                    f"LoRA pair {pair.name!r} has a frozen factor (requires_grad=False); the "
                    "full-gradient optimizers update both A and B"
                )
            site = _Site(pair, statistics, self)
            self._sites[pair.B] = site
            down, up = pair.modules
            self._handles.append(down.register_forward_hook(site.on_down_forward))
            self._handles.append(up.register_forward_hook(site.on_up_forward))
            self._handles.append(pair.B.register_post_accumulate_grad_hook(site.on_accumulated))
        self._complete_callbacks: list[Callable[[Tensor], None]] = []  # factor_grads=False
        self._frozen: list[Tensor] = []  # factors frozen for autograd (factor_grads=False)
        if not factor_grads:
            for pair in pairs:
                for factor in (pair.A, pair.B):
                    factor.requires_grad_(False)
                    self._frozen.append(factor)

    @property
    def pairs(self) -> list[LoRAPair]:
        return [site.pair for site in self._sites.values()]

    def pop(self, B: Tensor) -> CapturedGradient | None:
        """Take the gradient captured for the pair whose up factor is ``B``; ``None`` if none.

        The buffer is emptied. With a ``grad_scaler`` the loss scale is divided out.
        """
        site = self._sites.get(B)  # type: ignore[call-overload]
        if site is None:
            raise KeyError("this parameter is not the B factor of a captured LoRA pair")
        captured = site.take()
        if captured is not None and self.grad_scaler is not None and self.grad_scaler.is_enabled():
            captured.scale_(1.0 / self.grad_scaler.get_scale())
        return captured

    def on_complete(self, callback: Callable[[Tensor], None]) -> None:
        """Call ``callback(B)`` in backward as soon as the gradient of ``B``'s pair is complete.

        It fires once per backward pass and pair, after the pair's last row was recorded and its
        ``A.grad`` accumulated, or with ``factor_grads=False`` after the down map's backward of
        the layer's last call (see the module docstring); :meth:`pop` then returns the rows of
        every backward since the last pop. The hooks belong to the capture: :meth:`remove`
        removes them with the others.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if not self.factor_grads:
            # No A.grad accumulates: each site signals completion itself (see the docstring).
            self._complete_callbacks.append(callback)
            return
        for B, site in self._sites.items():
            self._handles.append(
                site.pair.A.register_post_accumulate_grad_hook(lambda _A, B=B: callback(B))
            )

    def gradient_was_zeroed(self, B: Tensor) -> bool:
        """Whether ``B.grad`` was ``None`` when the latest backward reached ``B``'s pair.

        ``True`` means the gradients were zeroed (``zero_grad``) before that backward: it is not
        a further micro-batch of an accumulation.
        """
        return self._sites[B].grad_was_zeroed  # type: ignore[index]

    def peek(self, B: Tensor) -> CapturedGradient | None:
        """The gradient captured so far for ``B``'s pair, without taking it."""
        return self._sites[B].captured  # type: ignore[index]

    def clear(self) -> None:
        """Drop every buffered row (for example after a step that was skipped)."""
        for site in self._sites.values():
            site.take()

    def remove(self) -> None:
        """Remove every hook, drop the buffers and unfreeze the factors. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._complete_callbacks.clear()
        for factor in self._frozen:
            factor.requires_grad_(True)
        self._frozen.clear()
        self.clear()

    def __enter__(self) -> GradientCapture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"GradientCapture({len(self._sites)} pairs, statistics={self.statistics!r}, "
            f"fold={self.fold!r}, factor_grads={self.factor_grads!r})"
        )


class _Site:
    """The hooks and the buffer of one pair."""

    def __init__(self, pair: LoRAPair, statistics: Statistics, owner: GradientCapture) -> None:
        self.pair = pair
        self.statistics = statistics
        self.owner = owner  # whose ``fold`` policy applies
        self.captured: CapturedGradient | None = None
        self._backward_finished = False  # a backward has written B.grad since the window opened
        self.grad_was_zeroed = True  # B.grad was None when the latest backward reached the pair
        self._down_input: Tensor | None = None
        self._down_output: Tensor | None = None
        # factor_grads=False, with on_complete listeners: the calls of this forward whose
        # backward has not yet passed the down map (one token per call).
        self._pending_call: int | None = None
        self._open_calls: set[int] = set()
        self._calls = 0  # numbers the calls

    def on_down_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        # The pending input waits for the up map. Rows are recorded only if the up output is
        # back-propagated, so forwards that are never differentiated (evaluation, no_grad, the
        # first pass of checkpointing) leave nothing, whatever the module's train/eval mode.
        if not (torch.is_grad_enabled() and isinstance(output, Tensor)):
            self._down_input = self._down_output = None
            return None
        if self.owner.factor_grads:
            self._down_input, self._down_output = _saved_input(args[0], output), output
            return None
        # Factors frozen for autograd: nothing saves the input for A.grad any more, so keep it
        # as the product consumed it (autocast's cast), and keep the branch differentiable.
        self._down_input = args[0].detach().to(output.dtype)
        if not output.requires_grad:
            output = output.detach().requires_grad_()
        self._down_output = output
        if self.owner._complete_callbacks:
            self._watch_down_backward(args[0], output)
        return output

    def _watch_down_backward(self, inputs: Any, output: Tensor) -> None:
        """Hook the moment this call's down-map backward is done (``factor_grads=False``).

        The gradient of the down map's input is formed from the down map's backward, the last
        use of ``A`` and ``B`` for this call; an input that needs no gradient has none, and then
        the down output (a leaf here) is hooked when its gradient accumulates, after the up
        map's backward, the last use of ``B``.
        """
        call = self._pending_call = self._calls
        self._calls += 1
        if isinstance(inputs, Tensor) and inputs.requires_grad:
            inputs.register_hook(lambda grad: self._call_done(call))
        else:
            output.register_post_accumulate_grad_hook(lambda leaf: self._call_done(call))

    def on_up_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        inputs, self._down_input = self._down_input, None
        produced, self._down_output = self._down_output, None
        call, self._pending_call = self._pending_call, None
        if inputs is None or not args or args[0] is not produced:
            return  # not the down map's output of this forward: nothing to pair
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self.record(grad, inputs))
            if call is not None:
                self._open_calls.add(call)

    def _call_done(self, call: int) -> None:
        if call not in self._open_calls:
            return  # a call that was never paired, or whose window was already taken
        self._open_calls.discard(call)
        if not self._open_calls and self.captured is not None:
            for callback in list(self.owner._complete_callbacks):
                callback(self.pair.B)

    def record(self, grad: Tensor, inputs: Tensor) -> None:
        """Called in backward with ``∂L/∂(up output)``; adds the rows to the window."""
        m, n = self.pair.shape
        S = grad.detach().reshape(-1, m)
        X = inputs.reshape(-1, n)
        self.grad_was_zeroed = self.pair.B.grad is None  # B.grad is written after every call
        if self._backward_finished and self.pair.B.grad is None:
            self.take()  # .grad was zeroed after a finished backward, with no step: start over
        captured = self.captured = self.captured or CapturedGradient()
        captured.num_rows += S.shape[0]
        self._add_statistics(captured, S, X)
        fold = self.owner.fold and captured.num_rows * (m + n) > m * n
        if captured.dense is None and not fold:
            captured.rows.append((S, X))
            return
        if captured.dense is None and not captured.rows:
            # The window's first rows, already past the fold: the product is the accumulator
            # (no zeros to add it to: one launch fewer per layer and step on a GPU).
            captured.dense = _new_product(S, X)
            return
        if captured.dense is None:  # fold the rows kept so far: the dense form is now smaller
            captured.dense = captured.to_dense()
            captured.rows = []
        _add_product_(captured.dense, S, X)

    def _add_statistics(self, captured: CapturedGradient, S: Tensor, X: Tensor) -> None:
        if self.statistics is None:
            return
        dtype = _accumulate_dtype(S)
        S, X = S.to(dtype), X.to(dtype)
        if self.statistics == "diagonal":
            updates = {"input_sq_sum": X.square().sum(0), "output_grad_sq_sum": S.square().sum(0)}
        else:
            updates = {"input_gram": X.mT @ X, "output_grad_gram": S.mT @ S}
        for name, value in updates.items():
            current = getattr(captured, name)
            setattr(captured, name, value if current is None else current + value)

    def on_accumulated(self, B: Tensor) -> None:
        self._backward_finished = self.captured is not None

    def take(self) -> CapturedGradient | None:
        captured, self.captured = self.captured, None
        self._backward_finished = False
        self._open_calls.clear()  # calls whose backward never came (unused outputs) end here
        return captured


def _saved_input(inputs: Tensor, output: Tensor) -> Tensor:
    """The down map's input as autograd saved it for the map's own backward, else ``inputs``.

    Under autocast the down map casts its input (float32 to bfloat16, say) and autograd saves
    that cast copy for ``A.grad``; holding the uncast input as well would keep a second, wider
    copy of every adapter's input alive from the forward to the layer's backward (for SmolLM2
    with rank-16 LoRA on all seven linears, 2.4 GB at 8 × 512 tokens). The cast copy is the
    matrix product's saved operand, read from the output's ``grad_fn`` (``mm``'s ``self``, or
    ``addmm``'s ``mat1`` with a bias, behind a view); the rows are then exactly the ``X`` of
    autograd's own ``A.grad``. Without a cast (the input is what autograd saves), under
    saved-tensor hooks (activation checkpointing, offloading: reading a saved tensor there
    would unpack it) or for any graph not of that shape, the input itself is kept.
    """
    if inputs.dtype == output.dtype or output.grad_fn is None:
        return inputs.detach()
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return inputs.detach()
    node = output.grad_fn
    if node.name() in ("UnsafeViewBackward0", "ViewBackward0") and node.next_functions:
        node = node.next_functions[0][0]
    saved = None
    if node is not None and node.name() == "MmBackward0":
        saved = node._saved_self
    elif node is not None and node.name() == "AddmmBackward0":
        saved = node._saved_mat1
    if saved is None or saved.numel() != inputs.numel() or saved.shape[-1] != inputs.shape[-1]:
        return inputs.detach()
    return saved.detach()


def _add_product_(dense: Tensor, S: Tensor, X: Tensor) -> None:
    """``dense += Sᵀ X``; for low-precision rows the product is taken in their own dtype.

    Rows of one 16-bit dtype come from an autocast (or half-precision) layer, whose weight
    gradient autograd itself computes in that dtype; the product is rounded once and
    accumulated in ``dense`` (float32). Converting the rows to float32 first would cost a
    full-precision ``2 N m n`` product, the dominant cost of folding on an accelerator.
    """
    if S.dtype == X.dtype and S.dtype in (torch.bfloat16, torch.float16):
        dense.add_(S.mT @ X)
    else:
        dense.addmm_(S.mT.to(dense.dtype), X.to(dense.dtype))


def _new_product(S: Tensor, X: Tensor) -> Tensor:
    """``Sᵀ X`` as a new accumulator: :func:`_add_product_` into zeros, without the zeros."""
    dtype = _accumulate_dtype(S)
    if S.dtype == X.dtype and S.dtype in (torch.bfloat16, torch.float16):
        return (S.mT @ X).to(dtype)
    return S.mT.to(dtype) @ X.to(dtype)


def _accumulate_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)
