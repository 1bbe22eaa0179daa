"""PEFT LoRA layers as :class:`~lorsum.LoRAPair` values, and the param groups built from them.

Layers are found by ``isinstance`` against PEFT's ``LoraLayer``; ``A``, ``B`` and the scaling are
read from the adapter-keyed dicts (never assumed to be ``alpha / r``). ``peft`` is imported inside
the functions.

Why the pair's modules are ``(lora_A[name], lora_B[name])``: in every PEFT linear LoRA layer the
plain (non-variant) forward is ``result + lora_B(lora_A(dropout(x))) * scaling`` (peft 0.21.2,
``peft/tuners/lora/layer.py``, ``Linear.forward``; the same chain in the quantised wrappers), so
the input of ``lora_A`` is the dropped-out layer input and ``lora_B`` is called directly on
``lora_A``'s output, which is what :class:`~lorsum.GradientCapture` needs to record
``s · ∂L/∂W`` with autograd's own dropout mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lorsum.lora import LoRAPair, dense_param_group, dense_parameters, pair_param_groups

__all__ = ["dense_parameters", "lora_pairs", "param_groups"]


def lora_pairs(model: nn.Module, adapter_name: str | None = None) -> list[LoRAPair]:
    """The trainable LoRA adapters of a PEFT model, one :class:`~lorsum.LoRAPair` per layer.

    For each PEFT LoRA layer that carries the adapter, the pair is
    ``A = lora_A[adapter].weight (r, n)``, ``B = lora_B[adapter].weight (m, r)``,
    ``scaling = layer.scaling[adapter]`` (so rsLoRA, ``rank_pattern`` and ``alpha_pattern`` are
    taken into account), ``name`` = the layer's module path in ``model`` and
    ``modules = (lora_A[adapter], lora_B[adapter])`` for :class:`~lorsum.GradientCapture`.

    Supported: linear LoRA layers (``peft.tuners.lora.Linear``, also on GPT-2's ``Conv1D`` with
    ``fan_in_fan_out=True``, which only changes how PEFT merges, and PEFT's quantised linear
    wrappers, whose forward chains ``lora_B(lora_A(dropout(x)))`` the same way), any
    ``lora_dropout``, rsLoRA, per-layer ranks and alphas, and ``lora_bias=True`` (the bias of
    ``lora_B`` is then an ordinary trainable parameter: see :func:`dense_parameters`). Layers
    whose adapter factors are both frozen (``requires_grad=False``) are left out: they are not
    being trained.

    The scaling is read once: if it is changed later (``set_scale``, ``scale_layer``), build the
    pairs (and the optimizer) again.

    Args:
        model: a ``PeftModel``, or any module with PEFT LoRA layers injected.
        adapter_name: the adapter to take (default: the active one, which must be unique).

    Returns:
        The pairs, in ``named_modules`` order.

    Raises:
        ImportError: ``peft`` is not installed.
        ValueError: no PEFT LoRA layer in ``model``; several active adapters and no
            ``adapter_name``; an unknown or inactive ``adapter_name``; no trainable pair; or a
            layer the gradient capture cannot handle (named in the message): merged or disabled
            adapters, DoRA or another LoRA variant that changes the forward, embedding, conv,
            ``MultiheadAttention`` or ``target_parameters`` LoRA.
    """
    lora = _import_peft_lora()
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, lora.LoraLayer)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no PEFT LoRA layers (peft.tuners.lora.LoraLayer); "
            "wrap it with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    name = _resolve_adapter(layers, adapter_name)
    pairs = []
    for path, layer in layers:
        if name not in layer.lora_A and name not in layer.lora_embedding_A:
            continue  # the adapter does not target this layer
        _check_layer_state(path, layer, name)
        if not _is_trainable(layer, name):
            continue
        _check_supported(lora, path, layer, name)
        down, up = layer.lora_A[name], layer.lora_B[name]
        pairs.append(
            LoRAPair(
                A=down.weight,
                B=up.weight,
                scaling=float(layer.scaling[name]),
                name=path,
                modules=(down, up),
            )
        )
    if not pairs:
        raise ValueError(
            f"adapter {name!r} has no trainable LoRA layer in {type(model).__name__}: every "
            "lora_A/lora_B is frozen (was the model loaded with is_trainable=False or "
            "inference_mode=True?)"
        )
    return pairs


def param_groups(
    model: nn.Module,
    pairs: Sequence[LoRAPair] | None = None,
    *,
    dense_lr: float = 1e-3,
    dense_optimizer: str = "adamw",
    dense_weight_decay: float = 0.0,
    **lora_hparams: Any,
) -> list[dict[str, Any]]:
    """Param groups for a lorsum optimizer: one group per LoRA pair, then one dense group.

    Args:
        model: the PEFT model.
        pairs: the LoRA pairs (default: :func:`lora_pairs` of ``model``, its active adapter).
        dense_lr: learning rate of the dense group (default: 1e-3).
        dense_optimizer: ``"adamw"`` (default) or ``"sgd"`` for the dense group.
        dense_weight_decay: weight decay of the dense group (default: 0).
        **lora_hparams: hyperparameters copied into every LoRA group (``lr``, ``num_iters``, ...).

    Returns:
        ``pair_param_groups(pairs, **lora_hparams)``, plus a ``kind="dense"`` group with
        :func:`dense_parameters` when there are any (an empty group is never created).

    Raises:
        ValueError: as :func:`lora_pairs`, or no pairs.
    """
    pairs = lora_pairs(model) if pairs is None else list(pairs)
    groups = pair_param_groups(pairs, **lora_hparams)
    dense = dense_parameters(model, pairs)
    if dense:
        groups.append(
            dense_param_group(
                dense, lr=dense_lr, dense_optimizer=dense_optimizer, weight_decay=dense_weight_decay
            )
        )
    return groups


# --- helpers ---------------------------------------------------------------------------------


def _import_peft_lora() -> Any:
    try:
        from peft.tuners import lora
    except ImportError as error:
        raise ImportError(
            "lorsum.integrations.peft needs peft: install it with pip install lorsum[peft]"
        ) from error
    return lora


def _resolve_adapter(layers: list[tuple[str, Any]], adapter_name: str | None) -> str:
    """The adapter to take: ``adapter_name`` if it exists, else the unique active adapter."""
    available: dict[str, None] = {}
    active: dict[str, None] = {}
    for _, layer in layers:
        available.update(dict.fromkeys([*layer.lora_A.keys(), *layer.lora_embedding_A.keys()]))
        active.update(dict.fromkeys(layer.active_adapters))
    if adapter_name is not None:
        if adapter_name not in available:
            raise ValueError(
                f"Unknown adapter_name: {adapter_name!r} (the LoRA layers hold {list(available)})"
            )
        return adapter_name
    active_here = [name for name in active if name in available]
    if len(active_here) != 1:
        raise ValueError(
            f"{len(active_here)} active LoRA adapters ({active_here}): pass adapter_name= one of "
            f"{list(available)}"
        )
    return active_here[0]


def _check_layer_state(path: str, layer: Any, name: str) -> None:
    """Merged, disabled or inactive adapters skip the LoRA branch: nothing could be captured."""
    if layer.merged:
        raise ValueError(
            f"LoRA layer {path!r}: adapters {layer.merged_adapters} are merged into the base "
            "weight, so its forward skips the LoRA branch; call model.unmerge_adapter() first"
        )
    if layer.disable_adapters:
        raise ValueError(
            f"LoRA layer {path!r}: adapters are disabled, so its forward skips the LoRA branch; "
            "enable them (leave the disable_adapter() context) first"
        )
    if name not in layer.active_adapters:
        raise ValueError(
            f"LoRA layer {path!r}: adapter {name!r} is not active (active: "
            f"{layer.active_adapters}), so its forward skips it; call model.set_adapter({name!r})"
        )


def _is_trainable(layer: Any, name: str) -> bool:
    factors = [d[name] for d in (layer.lora_embedding_A, layer.lora_embedding_B) if name in d]
    for modules in (layer.lora_A, layer.lora_B):
        if name in modules:
            factors += list(modules[name].parameters())
    return any(p.requires_grad for p in factors)


def _check_supported(lora: Any, path: str, layer: Any, name: str) -> None:
    """Refuse every layer whose forward is not ``lora_B(lora_A(dropout(x)))`` on linear maps."""
    variants = getattr(layer, "lora_variant", {})  # peft < 0.15 has DoRA only, in use_dora
    if name in variants or layer.use_dora.get(name, False):
        variant = "DoRA" if layer.use_dora.get(name, False) else type(variants[name])
        raise ValueError(
            f"LoRA layer {path!r}: adapter {name!r} uses {getattr(variant, '__name__', variant)}, "
            "a LoRA variant whose forward is not s·B A x; lorsum's optimizers step plain LoRA only"
        )
    layer_types = lora.layer
    unsupported = (
        ("embedding", ("Embedding",)),
        ("conv", ("Conv1d", "Conv2d", "Conv3d")),
        ("MultiheadAttention", ("MultiheadAttention",)),
        ("target_parameters (ParamWrapper)", ("ParamWrapper",)),
    )
    for kind, class_names in unsupported:
        # getattr: a class missing from the installed peft cannot occur in the model either.
        classes = tuple(getattr(layer_types, c) for c in class_names if hasattr(layer_types, c))
        if classes and isinstance(layer, classes):
            raise ValueError(
                f"LoRA layer {path!r}: {kind} LoRA is not supported by lorsum's gradient capture "
                "yet; leave this layer out of target_modules / target_parameters (its adapter "
                "could be trained by a dense group in the future)"
            )
    if name in layer.lora_embedding_A:
        raise ValueError(
            f"LoRA layer {path!r}: embedding LoRA is not supported by lorsum's gradient capture yet"
        )
    down, up = layer.lora_A[name], layer.lora_B[name]
    for label, module in (("lora_A", down), ("lora_B", up)):
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"LoRA layer {path!r}: {label}[{name!r}] is a {type(module).__name__}, not an "
                "nn.Linear; lorsum's gradient capture supports linear LoRA only"
            )
