"""Bone / MiSS adapters: PEFT's MiSS behind small helpers, and lorsum's own Bat layer.

MiSS (formerly Bone) trains a zero-initialised block ``D`` that is shared by every ``r``-wide
column block of a frozen weight; Bat is the weight-guided form, whose update is a learned
right-multiplication of each ``r × r`` block of the frozen weight (arXiv 2409.15371).

Which optimizers apply: neither update is a LoRA pair ``s · B @ A`` (MiSS trains one block
``D`` with ``ΔW = Dᵀ S`` for a fixed 0/1 matrix ``S``; Bat trains ``D`` with ``ΔW_ij = (W_ij + I)
D_i``), so LoRSum, ScaledLoRSum, SVDLoRA, PrecondLoRA and LoRA-Pro, which all act on a ``(B, A)``
pair, do not apply. Train the blocks with ``torch.optim.AdamW`` or ``torch.optim.SGD`` (or any
optimizer of plain tensors), e.g. ``AdamW(miss_trainable_parameters(model).values())``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BatLinear",
    "add_bat",
    "bat_delta_weight",
    "bat_state_dict",
    "bat_unmerge_weight",
    "load_bat_state_dict",
    "miss_config",
    "miss_parameter_count",
    "miss_trainable_parameters",
]

# Our names for PEFT's ``MissConfig.init_weights`` values (PEFT 0.21.2, peft/tuners/miss).
_PEFT_INIT_WEIGHTS: dict[str, bool | str] = {"balance": True, "mini": "mini", "bat": "bat"}


# --- MiSS / Bone through PEFT -----------------------------------------------------------------


def miss_config(
    target_modules: str | Iterable[str],
    r: int = 64,
    *,
    variant: str = "balance",
    mini_r: int | None = None,
    dropout: float = 0.0,
    **config_kwargs: Any,
) -> Any:
    """A ``peft.MissConfig`` for one of the three MiSS variants, with validated arguments.

    For a frozen ``W ∈ R^{m×n}`` (``m`` = out_features, ``n`` = in_features) and a token
    ``x ∈ R^n``, the variants are (the trainable ``D`` starts at zero, there is no scaling):

    - ``"balance"`` (MiSS/Bone's default): ``D ∈ R^{r×m}``, ``h = W x + Dᵀ Σ_k x_k`` where ``x_k``
      are the ``r``-wide chunks of ``x`` (the last one zero-padded), i.e. ``ΔW = Dᵀ S`` with
      ``S = [I_r I_r … I_r] ∈ R^{r×n}`` truncated to ``n`` columns. ``r·m`` parameters.
    - ``"mini"``: ``D ∈ R^{r×mini_r}`` tiled ``m / mini_r`` times along the outputs, then as
      balance. ``r·mini_r`` parameters; needs ``mini_r | m`` in every targeted layer.
    - ``"bat"``: ``r`` is the block size, ``D ∈ R^{(m/r)×r×r}`` and ``ΔW_ij = (W_ij + I) D_i``
      (see :class:`BatLinear`). ``m·r`` parameters; needs ``r | m`` and ``r | n``.

    Args:
        target_modules: as PEFT's ``target_modules``: names matched exactly or as a ``.``-suffix,
            a regex string, or ``"all-linear"`` (what the official MiSS scripts adapt).
        r: the rank (the block size for ``"bat"``) (default: 64, PEFT's and the paper's).
        variant: ``"balance"``, ``"mini"`` or ``"bat"`` (default: ``"balance"``).
        mini_r: the tiled output width; required for ``"mini"`` and refused otherwise.
        dropout: dropout on the adapter's input, PEFT's ``miss_dropout`` (default: 0, as the
            official scripts). Refused for ``"bat"``, whose PEFT forward ignores it.
        **config_kwargs: passed on to ``peft.MissConfig`` (``exclude_modules``, ``bias``,
            ``modules_to_save``, ``task_type``, ...), except ``init_weights``, set by ``variant``.

    Returns:
        The ``peft.MissConfig``; wrap a model with ``peft.get_peft_model(model, config)``.

    Raises:
        ImportError: ``peft`` is not installed.
        ValueError: an unknown variant, ``r < 1``, a missing or unexpected ``mini_r``, a dropout
            outside ``[0, 1)`` or with ``"bat"``, or ``init_weights`` in ``config_kwargs``.
    """
    peft = _import_peft()
    _check_variant_and_ranks(variant, r, mini_r)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Invalid dropout: {dropout} (must satisfy 0 <= dropout < 1)")
    if variant == "bat" and dropout > 0:
        raise ValueError(
            f"dropout={dropout} with variant='bat': PEFT's Bat forward ignores miss_dropout"
        )
    if "init_weights" in config_kwargs:
        raise ValueError(
            f"init_weights={config_kwargs['init_weights']!r}: choose the variant with "
            "variant='balance' | 'mini' | 'bat' instead"
        )
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    return peft.MissConfig(
        r=r,
        mini_r=1 if mini_r is None else mini_r,  # PEFT's default; unused outside "mini"
        miss_dropout=dropout,
        init_weights=_PEFT_INIT_WEIGHTS[variant],
        target_modules=target_modules,
        **config_kwargs,
    )


def miss_parameter_count(
    shapes: Iterable[tuple[int, int]],
    r: int,
    *,
    variant: str = "balance",
    mini_r: int | None = None,
) -> int:
    """The paper's trainable-parameter count of a MiSS variant, summed over layers.

    Per layer of shape ``(m, n)`` = ``(out_features, in_features)``: ``r·m`` for ``"balance"``,
    ``r·mini_r`` for ``"mini"`` and ``m·r`` for ``"bat"`` (``(m/r)`` blocks of ``r × r``). Each
    shape is also checked the way PEFT (and :class:`BatLinear`) would: ``r <= n``, ``mini_r | m``
    for ``"mini"``, ``r | m`` and ``r | n`` for ``"bat"``.

    Args:
        shapes: ``(out_features, in_features)`` of each adapted layer.
        r: the rank (the block size for ``"bat"``).
        variant: ``"balance"`` (default), ``"mini"`` or ``"bat"``.
        mini_r: required for ``"mini"``, refused otherwise.

    Returns:
        The number of trainable scalars.

    Raises:
        ValueError: a bad variant, ``r`` or ``mini_r``, a shape that is not two positive ints, or
            a shape the variant cannot adapt (the message names it).
    """
    _check_variant_and_ranks(variant, r, mini_r)
    total = 0
    for shape in shapes:
        m, n = _check_shape(shape)
        if r > n:
            raise ValueError(f"r={r} exceeds in_features={n} of a layer of shape {(m, n)}")
        if variant == "balance":
            total += r * m
        elif variant == "mini":
            if m % mini_r:
                raise ValueError(f"mini_r={mini_r} does not divide out_features={m} of {(m, n)}")
            total += r * mini_r
        else:
            _check_bat_divides((m, n), r, where=f"a layer of shape {(m, n)}")
            total += m * r
    return total


def miss_trainable_parameters(
    model: nn.Module, adapter_name: str | None = None
) -> dict[str, nn.Parameter]:
    """The trainable MiSS blocks ``D`` of a PEFT model, keyed by their layer's module path.

    Pass ``.values()`` to ``torch.optim.AdamW`` or ``SGD``; the sum of their ``numel()`` equals
    :func:`miss_parameter_count` of the adapted layers' shapes.

    Args:
        model: a ``PeftModel`` (or a module with PEFT MiSS layers injected).
        adapter_name: the adapter to take (default: the active one, which must be unique).

    Returns:
        ``{layer path: D}`` in ``named_modules`` order, frozen blocks left out.

    Raises:
        ImportError: ``peft`` is not installed.
        ValueError: no MiSS layer, an unknown adapter name, several active adapters and no
            ``adapter_name``, or no trainable block.
    """
    miss = _import_peft().tuners.miss
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, miss.MissLayer)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no PEFT MiSS layers (peft.tuners.miss.MissLayer); wrap "
            "it with peft.get_peft_model(model, miss_config(...)) first"
        )
    available = list(dict.fromkeys(name for _, layer in layers for name in layer.miss_block))
    if adapter_name is None:
        active = dict.fromkeys(name for _, layer in layers for name in layer.active_adapters)
        active_here = [name for name in active if name in available]
        if len(active_here) != 1:
            raise ValueError(
                f"{len(active_here)} active MiSS adapters ({active_here}): pass adapter_name= "
                f"one of {available}"
            )
        adapter_name = active_here[0]
    elif adapter_name not in available:
        raise ValueError(
            f"Unknown adapter_name: {adapter_name!r} (the MiSS layers hold {available})"
        )
    blocks = {
        path: layer.miss_block[adapter_name]
        for path, layer in layers
        if adapter_name in layer.miss_block and layer.miss_block[adapter_name].requires_grad
    }
    if not blocks:
        raise ValueError(
            f"adapter {adapter_name!r} has no trainable MiSS block in {type(model).__name__} "
            "(was it loaded with is_trainable=False?)"
        )
    return blocks


# --- Bat: the weight-guided form, as lorsum's own layer ---------------------------------------


def bat_delta_weight(weight: Tensor, bat_block: Tensor) -> Tensor:
    """Bat's update ``ΔW`` of a weight, block by block: ``ΔW_ij = W_ij D_i + D_i``.

    With ``r`` the block size, ``W`` is cut into ``r × r`` blocks ``W_ij`` (``i`` over the
    ``m / r`` output blocks, ``j`` over the ``n / r`` input blocks) and the block ``D_i`` is
    shared along block-row ``i``:

    .. math::
        \\Delta W_{ij} = (W_{ij} + I_r)\\, D_i .

    Args:
        weight: ``W`` (m, n), ``r | m`` and ``r | n``.
        bat_block: ``D`` (m / r, r, r).

    Returns:
        ``ΔW`` (m, n), differentiable in both arguments, in their promoted dtype.

    Raises:
        ValueError: the shapes do not fit (the message gives them).
    """
    p, r = _check_bat_shapes(weight, bat_block)
    m, n = weight.shape
    blocks = weight.reshape(p, r, n // r, r)  # [i, a, j, b] = W[i·r + a, j·r + b]
    # ΔW[i, a, j, c] = Σ_b W_ij[a, b] D_i[b, c] + D_i[a, c]
    delta = torch.einsum("iajb,ibc->iajc", blocks, bat_block) + bat_block.unsqueeze(2)
    return delta.reshape(m, n)


def bat_unmerge_weight(merged_weight: Tensor, bat_block: Tensor) -> Tensor:
    """The frozen weight back from a Bat-merged one: ``W_ij = (W'_ij − D_i)(I + D_i)⁻¹``.

    ``W' = W + ΔW`` gives ``W'_ij = W_ij (I + D_i) + D_i``; each block is recovered by a
    right-solve with ``I + D_i`` (one LU per ``i``, in the input dtype, no explicit inverse), so
    the round trip is exact up to rounding times the condition number of ``I + D_i``.

    Args:
        merged_weight: ``W'`` (m, n).
        bat_block: ``D`` (m / r, r, r).

    Returns:
        ``W`` (m, n).

    Raises:
        ValueError: the shapes do not fit, or some ``I + D_i`` is singular (no unique ``W``).
    """
    p, r = _check_bat_shapes(merged_weight, bat_block)
    m, n = merged_weight.shape
    eye = torch.eye(r, dtype=bat_block.dtype, device=bat_block.device)
    lu, pivots, info = torch.linalg.lu_factor_ex(eye + bat_block)  # (p, r, r), once per i
    if bool((info != 0).any()):
        singular = torch.nonzero(info).flatten().tolist()
        raise ValueError(
            f"I + D_i is singular for output blocks {singular}: the Bat merge cannot be undone"
        )
    q = n // r
    # [i, j, a, b] = W'_ij[a, b] − D_i[a, b]; the q blocks of row i stacked as a (q·r, r) matrix
    # share the system X (I + D_i) = rhs. (Stacking rather than broadcasting the LU over j: in
    # torch 2.13, lu_solve(left=False) with a broadcast batch dimension returns wrong values.)
    rhs = merged_weight.reshape(p, r, q, r).permute(0, 2, 1, 3) - bat_block.unsqueeze(1)
    solved = torch.linalg.lu_solve(lu, pivots, rhs.reshape(p, q * r, r), left=False)
    return solved.reshape(p, q, r, r).permute(0, 2, 1, 3).reshape(m, n)


class BatLinear(nn.Module):
    """A frozen ``nn.Linear`` plus Bat's weight-guided update (Block Affine Transformation).

    Bat is the MiSS form whose update is a learned linear map *of the frozen weight*. With block
    size ``r`` (``r | m``, ``r | n``) and ``W = base.weight`` cut into ``r × r`` blocks ``W_ij``:

    .. math::
        W_{ij} \\mapsto W_{ij} + (W_{ij} + I_r)\\, D_i , \\qquad
        y = x (W + \\Delta W)^\\top + b ,

    with ``D = bat_block ∈ R^{(m/r)×r×r}`` trainable and zero at init (so the layer starts as
    ``base`` exactly), ``D_i`` shared by the blocks of block-row ``i``, and no scaling factor.
    ``m·r`` trainable parameters. Same maths, block layout and zero init as PEFT 0.21.2's
    ``MissConfig(init_weights="bat")`` (``peft/tuners/miss/layer.py``; the tests check parity).
    Our own layer still serves: it needs torch only, adapts a plain model without PEFT's wrapper,
    exposes :meth:`delta_weight`, and unmerges exactly in float64 (see below).

    Choices where the spec leaves room, each tested:

    - ``D_i`` multiplies ``W_ij`` on the *right* and is shared along the *output* block-row,
      as in PEFT (the spec's ``ΔW_ij = W_ij D_i + D_i``).
    - The forward forms ``W + ΔW`` on every call (``O(mnr)`` FLOPs and an ``m × n`` transient,
      as PEFT), which suits batches of more than a few tokens. There is no dropout: the update
      is folded into the weight, so there is no separate adapter branch for it to act on (PEFT's
      Bat forward ignores ``miss_dropout`` too).
    - :meth:`unmerge` solves with ``I + D_i`` in the weight dtype (PEFT inverts in float32, so
      its float64 unmerge is only float32-accurate), and raises if some ``I + D_i`` is singular.
    - :meth:`merge` and :meth:`unmerge` raise on a repeated call instead of warning; while
      merged the forward is ``base(x)``, and :meth:`delta_weight` raises (``W0`` is not stored).

    Args:
        base: the linear layer to adapt; its parameters are frozen (``requires_grad=False``).
        block_size: ``r >= 1``, dividing both ``out_features`` and ``in_features``.
        name: the layer's name in its model (for messages).

    Example:
        >>> layer = BatLinear(nn.Linear(8, 4), block_size=2)
        >>> layer.bat_block.shape
        torch.Size([2, 2, 2])

    Reference: Kang, "MiSS" (formerly Bone, DiSHA), arXiv 2409.15371.
    """

    def __init__(self, base: nn.Linear, block_size: int, *, name: str = "") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"BatLinear adapts nn.Linear layers, got {type(base).__name__}")
        _check_positive_int("block_size", block_size)
        _check_bat_divides(
            (base.out_features, base.in_features), block_size, where=repr(name) if name else "base"
        )
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.bat_block = nn.Parameter(
            torch.zeros(
                base.out_features // block_size,
                block_size,
                block_size,
                device=base.weight.device,
                dtype=base.weight.dtype,
            )
        )
        self.block_size = block_size
        self.name = name
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        weight = self.base.weight
        return nn.functional.linear(
            x, weight + bat_delta_weight(weight, self.bat_block), self.base.bias
        )

    def delta_weight(self) -> Tensor:
        """``ΔW`` (m, n) for the current ``D``, differentiable in ``D``.

        Raises:
            ValueError: the layer is merged (the base weight is then ``W0 + ΔW``).
        """
        if self.merged:
            raise ValueError(
                f"BatLinear {self.name!r} is merged, so its base weight is W0 + ΔW; call "
                "unmerge() before delta_weight()"
            )
        return bat_delta_weight(self.base.weight, self.bat_block)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``ΔW`` into ``base.weight`` in place; the forward is then ``base(x)``.

        Raises:
            ValueError: already merged.
        """
        if self.merged:
            raise ValueError(f"BatLinear {self.name!r} is already merged")
        self.base.weight.add_(bat_delta_weight(self.base.weight, self.bat_block))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``base.weight = W0`` exactly (to rounding) by :func:`bat_unmerge_weight`.

        Raises:
            ValueError: not merged, or some ``I + D_i`` is singular.
        """
        if not self.merged:
            raise ValueError(f"BatLinear {self.name!r} is not merged")
        self.base.weight.copy_(bat_unmerge_weight(self.base.weight, self.bat_block))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, blocks={self.bat_block.shape[0]}, merged={self.merged}"
        )


def add_bat(
    model: nn.Module, target_modules: str | Iterable[str], block_size: int
) -> list[BatLinear]:
    """Replace the targeted ``nn.Linear`` sub-modules of ``model`` by :class:`BatLinear`, in place.

    A module is targeted when its name (as ``model.named_modules()`` spells it) equals a target or
    ends with ``"." + target``, as PEFT matches a list of ``target_modules``: ``"query"`` adapts
    every ``….query``, ``"layer.0.attention.self.query"`` one layer. Every target must match at
    least one module, and every match must be an ``nn.Linear`` that the block size divides.
    Everything is checked before the model is changed. As :func:`lorsum.add_lora`, only the
    wrapped layers are frozen: call ``model.requires_grad_(False)`` first to train the Bat blocks
    alone (what PEFT's ``get_peft_model`` does).

    Args:
        model: the model to adapt (modified in place, like PEFT's ``get_peft_model``).
        target_modules: one name or several.
        block_size: ``r``, as :class:`BatLinear`.

    Returns:
        The new layers, in ``named_modules`` order.

    Raises:
        ValueError: an empty target list, a target that matches nothing, a match that is not an
            ``nn.Linear`` (or is already a ``BatLinear``), a bad ``block_size``, or a layer whose
            shape ``block_size`` does not divide (the messages name them).
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("add_bat: target_modules is empty")
    _check_positive_int("block_size", block_size)
    modules = [(name, m) for name, m in model.named_modules() if name]
    chosen: dict[str, nn.Linear] = {}
    for target in dict.fromkeys(targets):
        matches = [(n, m) for n, m in modules if n == target or n.endswith("." + target)]
        if not matches:
            raise ValueError(f"add_bat: no module of {type(model).__name__} matches {target!r}")
        for name, module in matches:
            if isinstance(module, BatLinear):
                raise ValueError(f"add_bat: {name!r} is already a BatLinear")
            if not isinstance(module, nn.Linear):
                raise ValueError(
                    f"add_bat: {name!r} (matched by {target!r}) is a {type(module).__name__}, "
                    "not an nn.Linear"
                )
            _check_bat_divides(
                (module.out_features, module.in_features), block_size, where=repr(name)
            )
            chosen[name] = module
    order = {name: k for k, (name, _) in enumerate(modules)}
    layers = []
    for name in sorted(chosen, key=order.__getitem__):
        parent_name, _, child = name.rpartition(".")
        layer = BatLinear(chosen[name], block_size, name=name)
        setattr(model.get_submodule(parent_name), child, layer)
        layers.append(layer)
    return layers


def bat_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable Bat tensors of ``model`` only: ``{"<layer path>.bat_block": D}`` (detached).

    Save it with ``torch.save`` (it loads with ``weights_only=True``) or safetensors, and load it
    into a freshly adapted copy of the base model with :func:`load_bat_state_dict`, the way PEFT
    saves and loads only its adapter weights.

    Raises:
        ValueError: the model has no :class:`BatLinear`.
    """
    state = {
        f"{path}.bat_block": m.bat_block.detach()
        for path, m in model.named_modules()
        if isinstance(m, BatLinear)
    }
    if not state:
        raise ValueError(f"{type(model).__name__} has no BatLinear layers; add them with add_bat")
    return state


@torch.no_grad()
def load_bat_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy Bat blocks saved by :func:`bat_state_dict` into ``model``'s :class:`BatLinear` layers.

    The keys must be exactly the model's Bat blocks (no missing, no unexpected key) with the same
    shapes, and no layer may be merged (its base weight would no longer match its ``D``). Values
    are copied in place, cast to each block's dtype and device.

    Raises:
        ValueError: the model has no ``BatLinear``, the keys or shapes differ (named in the
            message), or a layer is merged.
    """
    layers = {
        f"{path}.bat_block": m for path, m in model.named_modules() if isinstance(m, BatLinear)
    }
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatLinear layers; add them with add_bat")
    missing = [key for key in layers if key not in state_dict]
    unexpected = [key for key in state_dict if key not in layers]
    if missing or unexpected:
        raise ValueError(
            f"Bat state dict mismatch: missing keys {missing}, unexpected {unexpected}"
        )
    for key, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{key}: the layer is merged; call unmerge() before loading")
        if tuple(state_dict[key].shape) != tuple(layer.bat_block.shape):
            raise ValueError(
                f"{key}: saved shape {tuple(state_dict[key].shape)} != the layer's "
                f"{tuple(layer.bat_block.shape)}"
            )
    for key, layer in layers.items():
        layer.bat_block.copy_(state_dict[key])


# --- helpers ---------------------------------------------------------------------------------


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "lorsum's MiSS helpers need peft: install it with pip install lorsum[peft]"
        ) from error
    return peft


def _check_variant_and_ranks(variant: str, r: Any, mini_r: Any) -> None:
    """A known PEFT variant, ``r >= 1``, and ``mini_r`` given exactly when the variant tiles."""
    if variant not in _PEFT_INIT_WEIGHTS:
        raise ValueError(
            f"Invalid variant: {variant!r} (must be one of {list(_PEFT_INIT_WEIGHTS)})"
        )
    _check_positive_int("r", r)
    if variant == "mini":
        if mini_r is None:
            raise ValueError("variant='mini' needs mini_r (the tiled output width, mini_r | m)")
        _check_positive_int("mini_r", mini_r)
    elif mini_r is not None:
        raise ValueError(f"mini_r={mini_r} is only used by variant='mini', not {variant!r}")


def _check_positive_int(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {label}: {value!r} (must be an int >= 1)")


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        m, n = shape
    except (TypeError, ValueError):
        raise ValueError(
            f"Invalid layer shape: {shape!r} (must be (out_features, in_features))"
        ) from None
    for size in (m, n):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"Invalid layer shape: {shape!r} (sizes must be ints >= 1)")
    return m, n


def _check_bat_divides(shape: tuple[int, int], block_size: int, *, where: str) -> None:
    m, n = shape
    if m % block_size or n % block_size:
        raise ValueError(
            f"Bat needs block_size to divide both dimensions: {where} has (out_features, "
            f"in_features) = {(m, n)}, block_size = {block_size} (it must divide {math.gcd(m, n)})"
        )


def _check_bat_shapes(weight: Tensor, bat_block: Tensor) -> tuple[int, int]:
    """``(p, r)`` for ``weight (p·r, q·r)`` and ``bat_block (p, r, r)``."""
    if weight.ndim != 2 or bat_block.ndim != 3 or bat_block.shape[1] != bat_block.shape[2]:
        raise ValueError(
            f"Bat needs weight (m, n) and bat_block (m/r, r, r), got {tuple(weight.shape)} and "
            f"{tuple(bat_block.shape)}"
        )
    p, r = bat_block.shape[0], bat_block.shape[1]
    m, n = weight.shape
    if r == 0 or m != p * r or n % r:
        raise ValueError(
            f"Bat shapes do not fit: weight {(m, n)} with bat_block {(p, r, r)} (need m = "
            f"{p}·{r} and {r} | n)"
        )
    return p, r
