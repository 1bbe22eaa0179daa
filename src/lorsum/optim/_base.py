"""The plumbing every lorsum optimizer shares: LoRA and dense param groups, state, clipping.

A param group is either ``kind="lora"``, holding exactly one adapter ``[A, B]`` with its
``lora_scaling`` and ``name`` (see :func:`lorsum.pair_param_groups`), or ``kind="dense"``,
holding any other trainable parameters (heads, biases), which are stepped by torch's own AdamW
or SGD (``dense_optimizer``). Every hyperparameter lives in the group, so schedulers and
``state_dict`` handle it; state holds tensors keyed by parameters only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

# torch.optim's functional updates; the package hides its submodules, so import them directly.
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

from lorsum.capture import CapturedGradient, GradientCapture
from lorsum.distributed import MeanReducer, check_unsharded, resolve_process_group
from lorsum.optim._stacking import Alone

__all__ = ["LoRAOptimizer"]

DENSE_DEFAULTS: dict[str, Any] = {
    "dense_optimizer": "adamw",
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "momentum": 0.0,
    "nesterov": False,
}
_COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# What a step whose new values are not all finite does: skip only the pairs concerned (no host
# synchronisation), or skip every pair and dense group of the optimizer (one per step).
NONFINITE_POLICIES = ("skip_pair", "skip_all")

PairWork = tuple[dict[str, Any], Tensor, Tensor, CapturedGradient | None]
"""One LoRA pair's share of a step: its group, ``A``, ``B`` and its captured gradient."""


class LoRAOptimizer(Optimizer):
    """Base class: validates groups, steps dense groups, clips, and guards against non-finite steps.

    Subclasses implement :meth:`_step_lora_group` (one pair), or override
    :meth:`_step_lora_groups` to step same-shape pairs as stacks (:mod:`lorsum.optim._stacking`).
    Those that step with the full gradient set ``needs_capture = True`` and receive it from a
    :class:`~lorsum.GradientCapture`.

    Args:
        params: param groups from :func:`lorsum.pair_param_groups` and
            :func:`lorsum.dense_param_group`.
        defaults: the subclass's default hyperparameters (for LoRA groups).
        capture: the capture that records every LoRA pair's full gradient.
        max_grad_norm: clip the global gradient norm to this value before stepping (``None``:
            no clipping). With a capture the norm includes each pair's full gradient
            ``‖∂L/∂W‖`` in factored form; otherwise the LoRA ``.grad`` tensors.
        nonfinite: what a step whose new values are not all finite does. ``"skip_pair"``
            (default): the pairs concerned keep their factors and state, the others step; no
            value is read back from the device. ``"skip_all"``: every pair and dense group of
            the optimizer keeps its values (one host synchronisation per step). Either way
            ``state[B]["skipped_steps"]`` counts the skips and one ``RuntimeWarning`` is given
            per optimizer (on CUDA, under ``"skip_pair"``, a step or two late: it is read
            without waiting). Not with ``step_in_backward`` for ``"skip_all"``.
        step_in_backward: step each LoRA pair inside ``backward()``, as soon as its full
            gradient is complete (:meth:`GradientCapture.on_complete`), and drop its captured
            rows at once, so that the capture never holds more than the layers whose backward
            is in flight; with ``backward_bucket=1`` it also sets the capture's
            ``fold = False`` (rows are never folded into ``m × n``, so each sweep costs
            ``4 r N (m + n)`` and no ``2 N m n`` fold is paid); :meth:`step` then steps the
            dense groups only. For the optimizers that capture the full gradient, without
            gradient accumulation (a second backward with no ``step()`` or ``zero_grad()`` in
            between raises) and without ``max_grad_norm`` (a global norm needs every gradient
            first). Default: ``False``.
        backward_bucket: with ``step_in_backward``, how many completed pairs of one stack
            (equal shapes, dtypes, hyperparameters and gradient layout) are stepped together, as
            one stacked step, instead of each on its own; each stack has its own bucket, and
            what the buckets hold when a backward ends is stepped then. A pair that is
            stepped alone anyway is stepped at once. The capture then holds up to
            ``backward_bucket - 1`` completed pairs per stack besides those in flight, and
            folds their rows into ``m × n`` where that is smaller, as without
            ``step_in_backward``. Default: ``1`` (each pair at once). On a GPU, where a pair's
            step alone costs its kernel launches whatever its size, a bucket of a few blocks'
            pairs removes most of the cost of stepping in backward.
        process_group: the data-parallel group whose ranks' captured gradients are averaged
            (DDP's convention for ``.grad``) before they are used, see :mod:`lorsum.distributed`:
            ``"auto"`` (default) the default group when ``torch.distributed`` is initialised
            with more than one rank, resolved at every step; ``None`` never (each process steps
            from its own gradient); or an explicit ``ProcessGroup``. Only the optimizers that
            capture the full gradient use it: the others step with ``.grad``, which DDP has
            already averaged. Every rank must step the same pairs in the same order (as DDP
            requires anyway); ``step_in_backward=True`` is refused with more than one rank.
    """

    needs_capture = False

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        capture: GradientCapture | None = None,
        max_grad_norm: float | None = None,
        step_in_backward: bool = False,
        process_group: Any = "auto",
        nonfinite: str = "skip_pair",
        backward_bucket: int = 1,
    ) -> None:
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be > 0 or None)")
        _check_step_in_backward(type(self), step_in_backward, max_grad_norm)
        if isinstance(backward_bucket, bool) or not isinstance(backward_bucket, int):
            raise ValueError(f"Invalid backward_bucket: {backward_bucket!r} (must be an int >= 1)")
        if backward_bucket < 1:
            raise ValueError(f"Invalid backward_bucket: {backward_bucket} (must be >= 1)")
        if backward_bucket != 1 and not step_in_backward:
            raise ValueError(
                f"backward_bucket={backward_bucket} without step_in_backward=True: the bucket "
                "holds pairs stepped inside backward"
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Invalid nonfinite: {nonfinite!r} (must be one of "
                f"{', '.join(map(repr, NONFINITE_POLICIES))})"
            )
        if nonfinite == "skip_all" and step_in_backward:
            raise ValueError(
                "nonfinite='skip_all' with step_in_backward=True: stepping in backward commits "
                "each pair before the others are computed; use nonfinite='skip_pair'"
            )
        self.nonfinite = nonfinite
        self._deferred: list[tuple[list[dict[str, Any]], list[Any]]] | None = None
        self._skip_counts: dict[torch.device, Tensor] = {}  # pairs skipped, per device
        self._skip_probe: tuple[Tensor, Any] | None = None  # (pinned copy, CUDA event)
        self._warned_nonfinite = False
        if self.needs_capture and capture is None:
            raise ValueError(
                f"{type(self).__name__} steps with the full gradient of each layer: pass "
                "capture=GradientCapture(pairs) (or build it with lorsum.create_optimizer)"
            )
        if capture is not None and not isinstance(capture, GradientCapture):
            raise TypeError(f"capture must be a GradientCapture, got {type(capture).__name__}")
        self.capture = capture  # plumbing, never serialised
        self.max_grad_norm = max_grad_norm
        self.step_in_backward = step_in_backward
        self.backward_bucket = backward_bucket
        # Completed in backward, not yet stepped: one bucket per stack (see _stack_of).
        self._buckets: dict[Hashable, list[PairWork]] = {}
        resolve_process_group(process_group)  # validates it now; "auto" is resolved per step
        self.process_group = process_group  # plumbing, never serialised
        self._reducers: dict[Any, MeanReducer] = {}  # one per group, so its counters persist
        if step_in_backward:
            self._refuse_step_in_backward_if_distributed()
        # Position in param_groups of each pair's group, keyed by B: positions survive
        # load_state_dict, which replaces the group dicts themselves.
        self._pair_group_index: dict[Tensor, int] = {}
        self._stepped_in_backward: set[Tensor] = set()  # B of pairs stepped since step()
        if isinstance(params, Tensor) or not isinstance(params, Iterable):
            raise TypeError("params must be an iterable of param groups (dicts)")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        for group in params:
            if not isinstance(group, dict):
                raise TypeError(
                    "lorsum optimizers take param groups, not bare tensors: build them with "
                    "lorsum.pair_param_groups(pairs) and lorsum.dense_param_group(params)"
                )
        super().__init__(params, defaults)
        if step_in_backward:
            # Stepped one by one, a layer's rows are consumed as soon as they are complete:
            # keep them as rows (a sweep over them is the cost floor) instead of folding them
            # into m × n. A bucket holds completed pairs until it fills, so the capture's
            # min(N (m + n), m n) policy applies again; it also lets a large layer's gradient
            # be stacked, as its folded form, where its rows are over the stacking limit.
            self.capture.fold = backward_bucket > 1  # type: ignore[union-attr]
            self.capture.on_complete(self._step_pair_in_backward)  # type: ignore[union-attr]

    # --- groups ----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        kind = param_group.setdefault("kind", "lora")
        if kind == "dense":
            for key, value in DENSE_DEFAULTS.items():
                param_group.setdefault(key, value)
            if param_group["dense_optimizer"] not in ("adamw", "sgd"):
                raise ValueError(
                    f"Invalid dense_optimizer: {param_group['dense_optimizer']!r} "
                    "(must be 'adamw' or 'sgd')"
                )
            if not list(param_group["params"]):
                raise ValueError("a dense param group is empty")
        elif kind == "lora":
            self._check_pair_group(param_group)
        else:
            raise ValueError(f"Invalid param group kind: {kind!r} (must be 'lora' or 'dense')")
        super().add_param_group(param_group)
        if kind == "lora":
            self._pair_group_index[param_group["params"][1]] = len(self.param_groups) - 1
            self._check_lora_hyperparameters(param_group)
            if self.capture is not None:
                try:
                    self.capture.peek(param_group["params"][1])
                except KeyError:
                    raise ValueError(
                        f"LoRA pair {param_group.get('name')!r} is not recorded by the capture"
                    ) from None

    def _check_pair_group(self, group: dict[str, Any]) -> None:
        name = group.setdefault("name", "")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if len(params) != 2:
            raise ValueError(
                f"LoRA group {name!r} must hold exactly [A, B], got {len(params)} parameters"
            )
        A, B = params
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"LoRA group {name!r}: expected [A (r, n), B (m, r)], got shapes "
                f"{tuple(A.shape)} and {tuple(B.shape)}"
            )
        check_unsharded(name, A, B)
        scaling = group.setdefault("lora_scaling", 1.0)
        if not (isinstance(scaling, int | float) and math.isfinite(scaling) and scaling > 0):
            raise ValueError(f"LoRA group {name!r}: invalid lora_scaling {scaling!r} (must be > 0)")

    def _check_lora_hyperparameters(self, group: dict[str, Any]) -> None:
        """Validate a LoRA group's hyperparameters, defaults filled in (subclasses extend it)."""
        _check_non_negative(group, "lr")
        _check_non_negative(group, "weight_decay")
        if group.get("compute_dtype") not in (None, *_COMPUTE_DTYPES):
            raise ValueError(
                f"LoRA group {group['name']!r}: invalid compute_dtype {group['compute_dtype']!r} "
                f"(must be None or one of {sorted(_COMPUTE_DTYPES)})"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, but every state tensor keeps the dtype it was saved in.

        torch casts each state tensor except ``step`` to its parameter's dtype, integer ones
        included: ``skipped_steps`` came back as a float (a bf16 counter stops at 256), and state
        kept wider than a bf16 parameter would be rounded. Devices still follow the parameters,
        so a checkpoint moves between CPU and CUDA with every value intact.
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
            raise TypeError(
                "load_state_dict expects the dict of an optimizer's state_dict(), with a "
                f"'state' entry; got {type(state_dict).__name__}"
            )
        saved = {
            (index, key): value.dtype
            for index, state in state_dict["state"].items()
            if isinstance(state, dict)
            for key, value in state.items()
            if isinstance(value, Tensor)
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in enumerate(params):
            state = self.state.get(param)
            for key, value in (state or {}).items():
                dtype = saved.get((index, key))
                if dtype is not None and isinstance(value, Tensor) and value.dtype != dtype:
                    state[key] = value.to(dtype)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch's load_state_dict takes the saved groups' hyperparameters as they are: a
        # checkpoint saved before a hyperparameter existed (foreach, for one) loads with its
        # default, as add_param_group would have filled it in.
        for group in self.param_groups:
            if group.get("kind", "lora") == "lora":
                for key, value in self.defaults.items():
                    group.setdefault(key, value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients; with a ``factor_grads=False`` capture also drop its rows.

        Such a capture's window is not the life of ``A.grad`` and ``B.grad`` (they are never
        set), so zeroing without a step (a discarded batch) must end it here.
        """
        self._flush_buckets()  # popped from the capture already: their step must not be lost
        super().zero_grad(set_to_none)
        if self.capture is not None and not self.capture.factor_grads:
            self.capture.clear()
        # A backward after zero_grad is a new window, not a further micro-batch, whether or not
        # step() ran in between (a step skipped by GradScaler, a discarded batch).
        self._stepped_in_backward.clear()

    # --- step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every group. ``closure`` re-evaluates the loss (under ``enable_grad``)."""
        for group in self.param_groups:
            if group["kind"] == "lora":
                # FSDP2 (via accelerate) and DeepSpeed swap the entries of param_groups after
                # construction, so the check at add_param_group is not enough.
                check_unsharded(group["name"], *group["params"])
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._flush_buckets()  # normally empty: a backward's end flushes it
        captured = self._take_captures()
        reducer = self.reducer if self.needs_capture else None
        if self.max_grad_norm is not None:
            if reducer is not None:
                # ‖Σ_k G_k‖² has cross-rank terms ⟨G_k, G_l⟩ that no rank can form from its own
                # rows: average the dense gradients (m·n per layer) and step from those.
                self._average_dense_(list(captured.values()), reducer)
            self._clip_(captured)
        self._check_skip_probe()
        skip_all = self.nonfinite == "skip_all"
        dense_groups: list[dict[str, Any]] = []
        work: list[PairWork] = []
        for group in self.param_groups:
            if group["kind"] == "dense":
                if skip_all:
                    dense_groups.append(group)  # stepped only if the whole step is finite
                else:
                    self._step_dense_group(group)
                continue
            A, B = group["params"]
            if B in self._stepped_in_backward:
                continue  # stepped inside backward already
            if self.needs_capture and B not in captured and B.grad is not None:
                # Autograd reached the pair but the capture saw no rows: hooks removed, or a
                # forward that does not chain up(down(x)). Say so instead of silently skipping.
                warnings.warn(
                    f"LoRA pair {group['name']!r} has a gradient but no captured rows; it is not "
                    "updated this step (was the capture removed, or the layer's forward changed?)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            work.append((group, A, B, captured.get(B)))
        if skip_all:
            self._deferred = []
            try:
                self._step_lora_groups(work)
                deferred = self._deferred
            finally:
                self._deferred = None
            self._commit_all_or_nothing(deferred, dense_groups)
        else:
            self._step_lora_groups(work)
            self._probe_skips()
        self._stepped_in_backward.clear()
        return loss

    # --- non-finite steps --------------------------------------------------------------------

    def _commit_all_or_nothing(
        self, deferred: list[tuple[list[dict[str, Any]], list[Any]]], dense: list[dict[str, Any]]
    ) -> None:
        """``nonfinite="skip_all"``: commit every pair and dense group, or none of them.

        The decision needs one value on the host, so this policy synchronises once per step
        (``"skip_pair"``, the default, never does).
        """
        flags = [torch.isfinite(new).all() for _, updates in deferred for _, _, new in updates]
        flags += [
            torch.isfinite(p.grad).all() for g in dense for p in g["params"] if p.grad is not None
        ]
        by_device: dict[torch.device, list[Tensor]] = {}
        for flag in flags:
            by_device.setdefault(flag.device, []).append(flag)
        # One read per device (one in all, for a model on one device).
        finite = all(bool(torch.stack(group).all()) for group in by_device.values())
        if finite:
            for states, updates in deferred:
                self._commit_stack_(states, updates)
            for group in dense:
                self._step_dense_group(group)
            return
        for states, updates in deferred:
            torch._foreach_add_(_skip_counters(states, updates[0][2].device), 1)
        self._warn_nonfinite()

    def _count_skips(self, skipped: Tensor) -> None:
        """Add this stack's skipped pairs to the device's running count (no host read)."""
        total = self._skip_counts.get(skipped.device)
        if total is None:
            self._skip_counts[skipped.device] = skipped.sum()
        else:
            total.add_(skipped.sum())

    def _probe_skips(self) -> None:
        """Warn once if a pair was skipped, without waiting for the device.

        On the CPU the count is read at once. On CUDA it is copied, asynchronously, into pinned
        host memory behind an event; the next step reads it if the event has completed, so the
        warning comes a step or two late and no step ever waits for it. Other devices give no
        warning (reading would wait for them); ``skipped_steps`` still counts every skip.
        """
        if self._warned_nonfinite or not self._skip_counts:
            return
        for device, total in self._skip_counts.items():
            if device.type == "cpu":
                if int(total) > 0:
                    self._warn_nonfinite()
                    return
            elif device.type == "cuda" and self._skip_probe is None:
                host = torch.empty((), dtype=total.dtype, pin_memory=True)
                host.copy_(total, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._skip_probe = (host, event)

    def _check_skip_probe(self) -> None:
        if self._skip_probe is None or self._warned_nonfinite:
            return
        host, event = self._skip_probe
        if event.query():  # done: reading the pinned copy now does not wait
            self._skip_probe = None
            if int(host) > 0:
                self._warn_nonfinite()

    def _warn_nonfinite(self) -> None:
        if self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        what = "every pair was" if self.nonfinite == "skip_all" else "the affected pairs were"
        warnings.warn(
            f"{type(self).__name__}: a step produced non-finite values, so {what} left "
            "untouched; state[B]['skipped_steps'] counts the skipped steps of each pair. "
            "This warning is given once per optimizer.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _step_pair_in_backward(self, B: Tensor) -> None:
        """Step ``B``'s pair now, in backward: its full gradient is complete (``on_complete``)."""
        index = self._pair_group_index.get(B)
        if index is None:
            return  # captured, but not one of this optimizer's pairs
        group = self.param_groups[index]
        capture = cast(GradientCapture, self.capture)  # set: step_in_backward requires it
        self._refuse_step_in_backward_if_distributed()
        # factor_grads=False sets no B.grad to look at: zero_grad() has emptied the set instead.
        zeroed = capture.factor_grads and capture.gradient_was_zeroed(B)
        if B in self._stepped_in_backward and not zeroed:
            raise RuntimeError(
                f"LoRA pair {group['name']!r}: a second backward() reached it with no step() "
                "or zero_grad() since the first; step_in_backward=True has already stepped it "
                "and cannot accumulate gradients over micro-batches. Build the optimizer with "
                "step_in_backward=False for gradient accumulation."
            )
        captured = capture.pop(B)
        if captured is None:
            return  # no rows (a forward the capture could not pair): step() will say so
        self._stepped_in_backward.add(B)
        item: PairWork = (group, group["params"][0], B, captured)
        key = self._stack_of(item)
        if key is None:
            return  # nothing to step for this pair (the optimizer's own rule)
        if isinstance(key, Alone) or self.backward_bucket == 1:
            self._step_now([item])  # no other pair would join its stack
            return
        if not self._buckets:
            # Runs when this backward pass ends, after every hook: what the buckets then hold
            # is stepped before backward() returns (a flush of empty buckets does nothing).
            torch.autograd.Variable._execution_engine.queue_callback(self._flush_buckets)
        # A bucket per stack: pairs complete in the order of the model's layers, a block's
        # shapes interleaved, so one shared bucket would split into a small stack per shape.
        bucket = self._buckets.setdefault(key, [])
        bucket.append(item)
        if len(bucket) >= self.backward_bucket:
            del self._buckets[key]
            self._step_now(bucket)

    def _flush_buckets(self) -> None:
        """Step the pairs completed in backward and not yet stepped, stacked as they fit."""
        if not self._buckets:
            return
        work = [item for bucket in self._buckets.values() for item in bucket]
        self._buckets = {}
        self._step_now(work)

    def _step_now(self, work: list[PairWork]) -> None:
        with torch.no_grad():
            self._step_lora_groups(work)

    def _stack_of(self, item: PairWork) -> Hashable | None:
        """The stack ``item`` is stepped in (:func:`group_stacks`'s key); ``None``: not stepped.
        Optimizers that stack override it; here every pair is stepped alone."""
        return Alone(id(item[2]))

    # --- data parallelism ------------------------------------------------------------------

    @property
    def reducer(self) -> MeanReducer | None:
        """The :class:`~lorsum.distributed.MeanReducer` of this step's process group, or ``None``.

        ``None`` on one process, with ``process_group=None``, or for optimizers that step with
        ``.grad`` (DDP averages it). Its ``bytes_reduced`` counts what the optimizer sent.
        """
        group = resolve_process_group(self.process_group)
        if group is None:
            return None
        # Keyed by None for the default group, which the optimizer must not hold (see MeanReducer).
        key = None if group is torch.distributed.group.WORLD else group
        if key not in self._reducers:
            self._reducers[key] = MeanReducer(group)
        return self._reducers[key]

    def _reducer_for(self, captured: CapturedGradient) -> MeanReducer | None:
        """The reducer for ``captured``'s products; ``None`` once it already is the global mean."""
        return None if captured.averaged else self.reducer

    @staticmethod
    def _average_dense_(captured: list[CapturedGradient], reducer: MeanReducer) -> None:
        """Replace each local gradient by the dense mean over ranks, in one collective.

        For what needs the global ``G`` itself, not products with it: a dense SVD, Shampoo's
        ``G Gᵀ`` and ``GᵀG``, the norm for clipping. It costs ``m n`` numbers per layer, as
        DDP of the full weights would.
        """
        local = [c for c in captured if not c.averaged]
        if not local:
            return
        for c, dense in zip(local, reducer([c.to_dense() for c in local]), strict=True):
            c.dense, c.rows, c.averaged = dense, [], True

    def _refuse_step_in_backward_if_distributed(self) -> None:
        if self.needs_capture and self.reducer is not None:
            raise ValueError(
                f"step_in_backward=True with world size {self.reducer.world_size}: stepping "
                "inside backward() would launch the optimizer's collectives in the middle of "
                "DDP's own bucketed gradient all-reduce, in an order no rank can guarantee; "
                "use step_in_backward=False (or process_group=None for independent processes)"
            )

    def _step_lora_groups(self, work: list[PairWork]) -> None:
        """Step every LoRA pair; subclasses that batch same-shape pairs override this."""
        for group, A, B, captured in work:
            self._step_lora_group(group, A, B, captured)

    def _step_lora_group(
        self, group: dict[str, Any], A: Tensor, B: Tensor, captured: CapturedGradient | None
    ) -> None:
        raise NotImplementedError

    def _take_captures(self) -> dict[Tensor, CapturedGradient]:
        if self.capture is None:
            return {}
        taken = {}
        for group in self.param_groups:
            if group["kind"] == "lora":
                B = group["params"][1]
                captured = self.capture.pop(B)
                if captured is not None:
                    taken[B] = captured
        return taken

    def _clip_(self, captured: dict[Tensor, CapturedGradient]) -> None:
        """Scale every gradient by ``min(1, max_norm / ‖g‖)`` with ``‖g‖`` the global norm."""
        squares: list[Tensor] = []
        grads: list[Tensor] = []
        for group in self.param_groups:
            if group["kind"] == "lora" and self.capture is not None:
                B = group["params"][1]
                if B in captured:
                    # ‖∂L/∂W‖² = ‖G‖² / s²: the capture holds G = s ∂L/∂W.
                    squares.append(captured[B].squared_norm() / group["lora_scaling"] ** 2)
                continue
            grads += [p.grad for p in group["params"] if p.grad is not None]
        squares += [g.float().square().sum() for g in grads]
        if not squares:
            return
        total = torch.stack([sq.to(squares[0].device) for sq in squares]).sum().sqrt()
        coef = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
        for c in captured.values():
            c.scale_(coef)

    def _step_dense_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if params:
            self._torch_step(group, params, [p.grad for p in params], group["dense_optimizer"])

    def _torch_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        algorithm: str,
        *,
        foreach: bool = False,
    ) -> None:
        """Torch's own ``"sgd"`` or ``"adamw"`` update of ``params`` along ``grads``.

        The math is ``torch.optim``'s functional code, not a rewrite; its state (``step``,
        ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) lives in ``self.state`` under
        torch's names, so it saves and loads like torch's optimizers. ``foreach=True`` is
        torch's multi-tensor implementation: a few kernels for all of ``params``.
        """
        if algorithm == "sgd":
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            torch_sgd(
                params, grads, buffers,
                weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                dampening=0.0, nesterov=group.get("nesterov", False), maximize=False,
                foreach=foreach,
            )  # fmt: skip
            if group["momentum"] > 0:
                for p, buf in zip(params, buffers, strict=True):
                    self.state[p]["momentum_buffer"] = buf
            return
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        torch_adam(
            params, grads,
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
            [], [self.state[p]["step"] for p in params],
            foreach=foreach, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )  # fmt: skip

    # --- helpers for subclasses ------------------------------------------------------------

    @staticmethod
    def _compute_dtype(group: dict[str, Any]) -> torch.dtype | None:
        name = group.get("compute_dtype")
        return None if name is None else _COMPUTE_DTYPES[name]

    def _low_rank_momentum(
        self, group: dict[str, Any], A: Tensor, B: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The momentum factors ``(M_B (m, r'), M_A (r', n))``, created at the first step.

        ``M_B = 0`` (so ``M_0 = 0``) and ``M_A`` has orthonormal rows: the starting subspace of
        the momentum's subspace iteration, spanning ``A``'s rows first (where the adapter already
        lives) and completed by a fixed pseudo-random basis.
        """
        state_A, state_B = self.state[A], self.state[B]
        if "momentum_buffer" not in state_B:
            n = A.shape[1]
            rank = min(group["momentum_rank"] or A.shape[0], n)
            # Columns in QR order: A's rows first, so the basis spans them before the rest.
            generator = torch.Generator().manual_seed(n * 7919 + rank)
            rows = torch.randn(rank, n, generator=generator, dtype=torch.float64)
            kept = min(rank, A.shape[0])
            rows[:kept] = A[:kept].detach().double().cpu()
            basis = torch.linalg.qr(rows.T).Q.T  # (r', n), orthonormal rows
            state_A["momentum_buffer"] = basis.to(device=A.device, dtype=A.dtype)
            state_B["momentum_buffer"] = B.new_zeros(B.shape[0], rank)
        return state_B["momentum_buffer"], state_A["momentum_buffer"]

    def _open_stack(
        self, members: list[PairWork]
    ) -> tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict[str, Any]]]:
        """A stack's group, its ``A``s and ``B``s, and their states (keyed by ``B``), each with
        a ``step`` counter (a 0-d CPU tensor, created at a pair's first step). The group is the
        first member's: a stack's key holds the hyperparameters, so every member agrees."""
        group = members[0][0]
        As, Bs = [A for _, A, _, _ in members], [B for _, _, B, _ in members]
        states = [self.state[B] for B in Bs]
        for state in states:
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
        return group, As, Bs, states

    def _commit_(self, group_state: dict[str, Any], updates: list[tuple[Tensor, Tensor]]) -> None:
        """Write ``new`` into each ``target`` only if every new value is finite.

        No value is read back from the device: a non-finite step leaves the targets untouched
        and increments ``group_state["skipped_steps"]`` (a tensor), so it can be audited.
        """
        self._commit_stack_(
            [group_state],
            [([target], target.unsqueeze(0), new.unsqueeze(0)) for target, new in updates],
        )

    def _commit_stack_(
        self, states: list[dict[str, Any]], updates: list[tuple[list[Tensor], Tensor, Tensor]]
    ) -> None:
        """:meth:`_commit_` for a stack of pairs: ``(targets, old (G, …), new (G, …))`` each.

        Pair ``i`` takes its new values only if all of its own are finite; the others keep
        theirs and count ``states[i]["skipped_steps"]``. Few kernels whatever ``G`` is, and no
        value read back from the device. Under ``nonfinite="skip_all"`` the commit waits for
        the end of the step (:meth:`_commit_all_or_nothing`).
        """
        if self._deferred is not None:
            self._deferred.append((states, updates))
            return
        finite = torch.stack(
            [torch.isfinite(new).reshape(len(new), -1).all(1) for _, _, new in updates]
        )
        finite = finite.all(0)  # (G,)
        for targets, old, new in updates:
            keep = finite.view(-1, *[1] * (new.ndim - 1))
            safe = torch.where(keep, new.to(old.dtype), old)
            torch._foreach_copy_(targets, list(safe.unbind(0)))
        skipped = _skip_counters(states, finite.device)
        not_finite = (~finite).to(torch.int64)
        torch._foreach_add_(skipped, list(not_finite.unbind(0)))
        self._count_skips(not_finite)


def advance_steps(states: list[dict[str, Any]]) -> None:
    """Add one to each state's ``step`` counter (0-d CPU tensors): one dispatch for a stack,
    where a loop would dispatch an operator, and convert the scalar, once per pair."""
    torch._foreach_add_([state["step"] for state in states], 1)


def _skip_counters(states: list[dict[str, Any]], device: torch.device) -> list[Tensor]:
    """Each state's ``skipped_steps`` counter, created once (a new tensor per step is a launch)."""
    for state in states:
        if "skipped_steps" not in state:
            state["skipped_steps"] = torch.zeros((), dtype=torch.int64, device=device)
    return [state["skipped_steps"] for state in states]


def _check_step_in_backward(
    cls: type[LoRAOptimizer], step_in_backward: object, max_grad_norm: float | None
) -> None:
    if not isinstance(step_in_backward, bool):
        raise ValueError(f"Invalid step_in_backward: {step_in_backward!r} (must be True or False)")
    if not step_in_backward:
        return
    if not cls.needs_capture:
        raise ValueError(
            f"step_in_backward=True: {cls.__name__} steps with autograd's LoRA gradients, not a "
            "captured full gradient; only LoRSum, ScaledLoRSum and SVDLoRA step in backward"
        )
    if max_grad_norm is not None:
        raise ValueError(
            f"step_in_backward=True with max_grad_norm={max_grad_norm!r}: clipping by the global "
            "norm needs every layer's gradient before the first step; use one or the other"
        )


def _check_non_negative(group: dict[str, Any], key: str) -> None:
    value = group.get(key)
    if isinstance(value, Tensor):
        return  # tensor hyperparameters (e.g. a scheduled lr) are checked by their owner
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"Invalid {key}: {value!r} (must be finite and >= 0)")


def _check_positive(group: dict[str, Any], key: str) -> None:
    value = group.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"Invalid {key}: {value!r} (must be finite and > 0)")


def _check_choice(group: dict[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    if group[key] not in allowed:
        raise ValueError(
            f"Invalid {key}: {group[key]!r} (must be one of {', '.join(map(repr, allowed))})"
        )


def _check_count(group: dict[str, Any], key: str, *, minimum: int, optional: bool = False) -> None:
    """An int ``>= minimum`` (or ``None`` when ``optional``): sweeps, ranks, iterations."""
    value = group[key]
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"Invalid {key}: {value!r} (must be {allowed})")


def _check_bool(group: dict[str, Any], key: str) -> None:
    if not isinstance(group[key], bool):
        raise ValueError(f"Invalid {key}: {group[key]!r} (must be True or False)")


def _check_fraction(group: dict[str, Any], key: str) -> None:
    """A momentum-like coefficient in ``[0, 1)``."""
    value = group[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {key}: {value!r} (must be in [0, 1))")


def _check_betas(group: dict[str, Any]) -> None:
    betas = group["betas"]
    ok = isinstance(betas, tuple | list) and len(betas) == 2
    ok = ok and all(not isinstance(b, bool) and isinstance(b, int | float) for b in betas)
    if not (ok and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"Invalid betas: {betas!r} (must be two numbers in [0, 1))")
