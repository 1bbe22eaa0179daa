"""Use lorsum's optimizers with the transformers ``Trainer`` (checked against transformers 5.23).

The ``Trainer`` takes an optimizer in three ways that work with lorsum:

1. **A built optimizer**, ``Trainer(optimizers=(optimizer, None))`` with
   ``optimizer = lorsum.create_optimizer(model, "lorsum", lr=...)``. With ``None`` the Trainer
   builds its LR scheduler on the optimizer's groups (every group has its own ``lr``).
2. **A class and its kwargs**, ``Trainer(optimizer_cls_and_kwargs=(LoRSum, kwargs))``: when
   ``kwargs`` holds ``"params"`` the Trainer calls ``LoRSum(kwargs.pop("params"), **kwargs)``,
   so pass ``{"params": param_groups(model), "capture": GradientCapture(pairs), "lr": ...}``
   (the Trainer pops ``"params"`` from that dict: build a new dict for every Trainer).
3. **An optimizer factory** (transformers 5), ``Trainer(optimizer_cls_and_kwargs=
   optimizer_cls_and_kwargs("lorsum", lr=...))``: the Trainer sees that
   :class:`OptimizerFactory` is not an ``Optimizer`` subclass, instantiates it without arguments
   and calls the instance with the model it trains (the prepared one where the Trainer delays
   optimizer creation) and the kwargs: ``OptimizerFactory()(model, **kwargs)``. Nothing touches the
   model before ``train()``.

What the Trainer does around ``optimizer.step()``, and what it means for capture-based methods
(``"lorsum"``, ``"scaled_lorsum"``, ``"svdlora"``):

* **Clipping.** With ``TrainingArguments(max_grad_norm > 0)`` (the default is 1.0) the Trainer
  clips ``p.grad`` only. The captured rows from which these methods step are not clipped, while
  the dense group's gradients are clipped by a norm that includes the LoRA ``.grad`` tensors.
  Set ``max_grad_norm=0`` in ``TrainingArguments`` and pass ``max_grad_norm`` to the lorsum
  optimizer instead: it clips the full gradient ``∂L/∂W`` of every layer, in factored form,
  together with the dense gradients. :func:`check_training_arguments` warns about this.
* **Zeroing.** The Trainer calls ``model.zero_grad()``, not ``optimizer.zero_grad()``. That is
  fine: the capture's window is the life of ``.grad`` and the optimizer empties it at each step.
* **Gradient accumulation** sums the micro-batches' rows exactly, and gradient checkpointing
  changes nothing. The Trainer divides each micro-batch loss by the accumulation steps, unless
  the model's ``forward`` takes ``**kwargs``, in which case it passes ``num_items_in_batch`` and
  expects the model to normalise. Models whose loss ignores it (in transformers 5.23 for
  example ``BertForSequenceClassification``; causal LMs do use it) then get gradients
  ``gradient_accumulation_steps`` times too large. Adam barely notices; SGD-type methods such as
  LoRSum take a proportionally larger step. Pass ``compute_loss_func`` or scale ``lr``.
* **Checkpoints** save ``optimizer.state_dict()`` (tensors only) and reload it with
  ``weights_only=True``.
* **Distributed training.** Under DDP (``torchrun`` or ``accelerate launch`` with several
  processes, no ``fsdp``/``deepspeed``) the capture-based optimizers average each layer's
  captured gradient over the ranks exactly as DDP averages ``.grad`` (``process_group="auto"``,
  see ``docs/distributed.md``): every rank takes the step of one process on the global batch.
  ``nn.DataParallel`` (several GPUs in one process) is refused: its replicas share the
  capture's hooks. FSDP and DeepSpeed shard or flatten the LoRA factors and are refused too
  (:func:`check_training_arguments`, and at the optimizer's first step).

``trainer.optimizer`` may be accelerate's wrapper; the lorsum optimizer is then
``trainer.optimizer.optimizer``. Remove the capture's hooks after training with
``optimizer.capture.remove()``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = [
    "CAPTURE_METHODS",
    "OptimizerFactory",
    "check_training_arguments",
    "optimizer_cls_and_kwargs",
]

CAPTURE_METHODS = ("lorsum", "scaled_lorsum", "svdlora")


class OptimizerFactory:
    """A transformers-5 optimizer factory: ``OptimizerFactory()(model, **kwargs)`` is the optimizer.

    Pass it as ``Trainer(optimizer_cls_and_kwargs=(OptimizerFactory, {"method": "lorsum", ...}))``
    (or use :func:`optimizer_cls_and_kwargs`). The Trainer calls the instance with the model it
    trains; the call is :func:`lorsum.create_optimizer`.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=data,  # doctest: +SKIP
        ...                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("lorsum", lr=0.1))
    """

    def __call__(
        self, model: nn.Module, method: str = "lorsum", **hparams: Any
    ) -> torch.optim.Optimizer:
        """Build ``method``'s optimizer for ``model``'s LoRA adapters and other parameters.

        Args:
            model: the model the Trainer trains (a PEFT model, or one with lorsum's LoRA layers).
            method: one of :data:`lorsum.METHODS` (default: ``"lorsum"``).
            **hparams: the keyword arguments of :func:`lorsum.create_optimizer` (``lr``,
                ``dense_lr``, ``num_iters``, ``max_grad_norm``, ...).

        Returns:
            The optimizer; for capture-based methods ``optimizer.capture`` holds the model's hooks.

        Raises:
            ValueError: as :func:`lorsum.create_optimizer`.
            NotImplementedError: the model's LoRA factors are sharded (FSDP2).
        """
        from lorsum.factory import create_optimizer

        return create_optimizer(model, method, **hparams)


def optimizer_cls_and_kwargs(
    method: str = "lorsum", **hparams: Any
) -> tuple[type[OptimizerFactory], dict[str, Any]]:
    """The ``optimizer_cls_and_kwargs`` argument of ``Trainer`` for a lorsum method.

    Args:
        method: one of :data:`lorsum.METHODS` (default: ``"lorsum"``).
        **hparams: keyword arguments of :func:`lorsum.create_optimizer` (``lr``, ``dense_lr``,
            ``num_iters``, ``damping``, ``max_grad_norm``, ...).

    Returns:
        ``(OptimizerFactory, {"method": method, **hparams})``, a new dict on every call (the
        Trainer may pop keys from it).

    Raises:
        ValueError: an unknown ``method``.

    Example:
        >>> cls_and_kwargs = optimizer_cls_and_kwargs("lorsum", lr=0.1, max_grad_norm=1.0)
        >>> trainer = Trainer(model, TrainingArguments(..., max_grad_norm=0),  # doctest: +SKIP
        ...                   optimizer_cls_and_kwargs=cls_and_kwargs)
    """
    from lorsum.factory import METHODS

    if method not in METHODS:
        raise ValueError(f"Unknown method: {method!r} (must be one of {', '.join(METHODS)})")
    return OptimizerFactory, {"method": method, **hparams}


def check_training_arguments(args: Any, optimizer: str | torch.optim.Optimizer = "lorsum") -> None:
    """Check ``TrainingArguments`` against a lorsum optimizer (or method name) before training.

    Args:
        args: the ``transformers.TrainingArguments``.
        optimizer: the optimizer given to the Trainer, or the method name (default: ``"lorsum"``).

    Raises:
        NotImplementedError: a capture-based optimizer with ``nn.DataParallel`` (``n_gpu > 1`` in
            one process), or any lorsum optimizer with FSDP or DeepSpeed, whose flattened or
            sharded parameters break the one-pair-per-group layout. DDP (``world_size > 1``)
            is supported.

    Warns:
        UserWarning: ``max_grad_norm > 0`` with a capture-based optimizer (see the module
        docstring: the Trainer would clip ``p.grad`` but not the captured gradient).
    """
    from lorsum.optim._base import LoRAOptimizer

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if isinstance(inner, str):
        captures, is_lorsum = inner in CAPTURE_METHODS, inner not in ("adamw", "sgd", "loraplus")
    else:
        captures = getattr(inner, "capture", None) is not None
        is_lorsum = isinstance(inner, LoRAOptimizer)
    if is_lorsum and (getattr(args, "fsdp", None) or getattr(args, "deepspeed", None)):
        raise NotImplementedError(
            "lorsum optimizers need whole A and B factors in one group per pair; FSDP "
            f"(fsdp={args.fsdp!r}) and DeepSpeed (deepspeed={args.deepspeed!r}) flatten or "
            "shard them: use DDP (launch several processes without fsdp or deepspeed)"
        )
    if captures and getattr(args, "n_gpu", 1) > 1:
        raise NotImplementedError(
            f"n_gpu={args.n_gpu} in one process means nn.DataParallel, whose replicas share the "
            "gradient capture's hooks; launch one process per device (torchrun or accelerate "
            "launch), which is DDP and exact"
        )
    if captures and args.max_grad_norm > 0:
        warnings.warn(
            f"TrainingArguments(max_grad_norm={args.max_grad_norm}) clips p.grad only, not the "
            "captured gradient this optimizer steps with; set max_grad_norm=0 there and pass "
            "max_grad_norm to the lorsum optimizer, which clips the full gradient",
            UserWarning,
            stacklevel=2,
        )
