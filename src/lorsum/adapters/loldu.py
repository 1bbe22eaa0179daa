"""LoLDU: a frozen pivoted LU of ``W0`` with only the diagonal ``z ∈ R^r`` trained per layer.

LoLDU trains one vector per layer, not a ``B @ A`` pair, so the lorsum optimizers built on LoRA
pairs (LoRSum, ScaledLoRSum, SVDLoRA, PrecondLoRA, LoRA-Pro) do not apply; train ``z`` (and the
scale, if trained) with torch's AdamW or SGD.

Reference: Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning", arXiv:2410.13618; official code ``SKDDJ/LoLDU`` (``minloldu``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from lorsum.functional.linalg import default_compute_dtype
from lorsum.functional.lu import dense_ldu_product, ldu_matmul, pivoted_ldu

__all__ = ["LoLDULinear", "add_loldu", "load_loldu_state_dict", "loldu_state_dict"]

LoLDUInit = Literal["lu", "ones", "zeros"]
_INITS = ("lu", "ones", "zeros")


class LoLDULinear(nn.Module):
    """A frozen ``nn.Linear`` re-expressed through its pivoted LU, with a trainable diagonal.

    With ``W0 = P L diag(d) Ū`` (:func:`~lorsum.functional.lu.pivoted_ldu`) and its first ``r``
    elimination steps ``L_r (m, r)``, ``d_r (r,)``, ``Ū_r (r, n)``:

    .. math::

        W_{res} = W_0 - s\\, P L_r \\operatorname{diag}(z_0) Ū_r, \\qquad
        W(z) = W_{res} + s\\, P L_r \\operatorname{diag}(z) Ū_r, \\qquad
        h = W_{res} x + b + s\\, P \\big(L_r (z ⊙ Ū_r x)\\big)

    so ``W(z_0) = W0``: the layer starts as ``base`` exactly (to one rounding of ``W_res``).
    Only ``z`` (``r`` numbers) is trained, plus the scalar ``s`` if ``train_scale``. The adapter
    path costs ``O((m + n) r)`` per token and never forms an ``m × n`` matrix. The gradient is
    ``∂L/∂z = s · diag(L_rᵀ Pᵀ G Ū_rᵀ)`` with ``G = ∂L/∂W``.

    State: ``z (r,)`` and, if ``train_scale``, ``scaling ()`` are parameters; the frozen buffers are
    ``perm (m,)`` (int64, ``P y = y[perm]``, never a dense ``m × m`` matrix), ``lower = L_r``,
    ``upper = Ū_r`` and ``z_init = z_0``. ``W_res`` is stored *in place of* ``base.weight`` (a new
    frozen ``Parameter``; the original tensor is not written to, so weights tied elsewhere keep
    ``W0``), hence no extra ``m × n`` memory. The LU runs once, in float32 (float64 for float64
    weights); the factors are stored in the weight's dtype, and ``W_res`` is computed from the
    stored (rounded) factors so that rounding them does not break function preservation.

    Args:
        base: the linear layer to adapt; its parameters are frozen and its ``weight`` replaced by
            ``W_res``.
        rank: ``r``, elimination steps kept, ``1 <= r <= min(m, n)`` (default: 4, the rank of the
            official ``from_linear`` constructor).
        alpha: ``s = alpha / r`` (default: ``rank``, so ``s = 1`` as in :class:`~lorsum.LoRALinear`;
            then ``W_res`` is exactly the Schur complement left after ``r`` elimination steps).
        train_scale: also train ``s`` as a 0-d parameter (default: False).
        init: ``z_0``: ``"lu"`` (``d_r``, the pivots; default), ``"ones"`` or ``"zeros"``. Every
            choice preserves the function, since ``W_res`` absorbs ``z_0``.
        rtol: zero-pivot tolerance passed to :func:`~lorsum.functional.lu.pivoted_ldu`.
        name: the layer's name in its model (for messages).

    .. note::
        The official code defaults to ``alpha = 1`` (``s = 1/4`` at rank 4); pass ``alpha=1`` to
        match it. It also registers ``s`` as a parameter but hands only ``z`` to the optimizer;
        whether the paper trains ``s`` is unverified, hence ``train_scale=False``. Zero pivots
        (rank-deficient ``W0``) are not divided by: that row of ``U`` is normalised by its
        largest entry instead (see :func:`~lorsum.functional.lu.pivoted_ldu`). Partial pivoting
        bounds ``|L_ij| <= 1`` but not ``Ū``: a small pivot ``d_i`` gives row ``Ū_i`` large
        entries, and ``z_i`` then moves ``W`` much faster than the other coordinates, which
        matters when choosing the learning rate.

    Example:
        >>> layer = LoLDULinear(nn.Linear(16, 8), rank=4)
        >>> opt = torch.optim.AdamW([layer.z], lr=1e-3)

    Reference: arXiv:2410.13618.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 4,
        *,
        alpha: float | None = None,
        train_scale: bool = False,
        init: LoLDUInit = "lu",
        rtol: float | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoLDULinear adapts nn.Linear layers, got {type(base).__name__}")
        alpha = _check_options(base, rank, alpha, init, rtol)
        W0 = base.weight.detach()
        dtype, device = W0.dtype, W0.device
        perm, L, d, U_bar = pivoted_ldu(W0, rank=rank, rtol=rtol)
        z0 = {"lu": d, "ones": torch.ones_like(d), "zeros": torch.zeros_like(d)}[init]
        scaling = alpha / rank

        self.base = base
        self.rank, self.alpha, self.train_scale = rank, alpha, bool(train_scale)
        self.init, self.name = init, name
        self.initial_scaling = scaling
        self.merged = False
        self.register_buffer("perm", perm)
        self.register_buffer("lower", L)
        self.register_buffer("upper", U_bar)
        self.register_buffer("z_init", z0.clone())
        self.z = nn.Parameter(z0.clone())
        if train_scale:
            self.scaling = nn.Parameter(torch.tensor(scaling, dtype=dtype, device=device))
        else:
            self.scaling = scaling
        # W_res from the factors as stored, in the compute dtype, then one cast.
        cd = default_compute_dtype(W0)
        W_res = W0.to(cd) - scaling * dense_ldu_product(perm, L.to(cd), z0.to(cd), U_bar.to(cd))
        for p in base.parameters():
            p.requires_grad_(False)
        base.weight = nn.Parameter(W_res.to(dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.scaling * ldu_matmul(x, self.perm, self.lower, self.z, self.upper)

    def trainable_parameter_count(self) -> int:
        """The paper's count: ``r`` per layer, plus 1 if the scale is trained."""
        return self.rank + int(self.train_scale)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``s · P L_r diag(z) Ū_r`` as a dense ``(m, n)`` tensor in the weight's dtype.

        Dense: for merging and tests only; the forward pass never forms it.
        """
        return self._delta(self._current_scaling(), self.z).to(self.base.weight.dtype)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The effective weight ``W_res + s · P L_r diag(z) Ū_r`` (dense ``(m, n)``)."""
        W = self.base.weight
        if self.merged:
            return W.clone()
        return (W.to(self._delta_dtype()) + self._delta(self._current_scaling(), self.z)).to(
            W.dtype
        )

    @torch.no_grad()
    def original_weight(self) -> Tensor:
        """``W0`` recovered as ``W_res + s_0 · P L_r diag(z_0) Ū_r`` (to rounding), unmerged.

        This is what removing the adapter restores: it ignores the trained ``z`` and ``s``.

        Raises:
            ValueError: the layer is merged (``unmerge`` first).
        """
        self._require_merged(False, "original_weight")
        W = self.base.weight
        return (W.to(self._delta_dtype()) + self._delta(self.initial_scaling, self.z_init)).to(
            W.dtype
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base.weight`` (``W_res + s P L_r diag(z) Ū_r``) and turn the
        adapter path off. Exact to rounding in float32/float64; one extra rounding in bf16.

        Raises:
            ValueError: the layer is already merged.
        """
        self._require_merged(False, "merge")
        self._add_to_weight(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from ``base.weight`` again and turn the adapter path back on.

        Restores ``W_res`` to rounding (the same ``s`` and ``z`` as at ``merge`` are subtracted).

        Raises:
            ValueError: the layer is not merged.
        """
        self._require_merged(True, "unmerge")
        self._add_to_weight(-1.0)
        self.merged = False

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Set ``z`` back to ``z_0`` (and ``s`` to ``alpha / r``): the layer computes ``W0`` again.

        Raises:
            ValueError: the layer is merged (``unmerge`` first).
        """
        self._require_merged(False, "reset_adapter")
        self.z.copy_(self.z_init)
        if isinstance(self.scaling, Tensor):
            self.scaling.fill_(self.initial_scaling)

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, scaling={float(self._current_scaling()):g}, "
            f"train_scale={self.train_scale}, init={self.init!r}, merged={self.merged}"
        )

    def _current_scaling(self) -> float:
        s = self.scaling
        return float(s.detach()) if isinstance(s, Tensor) else s

    def _delta_dtype(self) -> torch.dtype:
        return default_compute_dtype(self.base.weight)

    def _delta(self, scaling: float, z: Tensor) -> Tensor:
        cd = self._delta_dtype()
        return scaling * dense_ldu_product(
            self.perm, self.lower.to(cd), z.detach().to(cd), self.upper.to(cd)
        )

    def _add_to_weight(self, sign: float) -> None:
        W = self.base.weight
        W.copy_(W.to(self._delta_dtype()) + sign * self._delta(self._current_scaling(), self.z))

    def _require_merged(self, expected: bool, action: str) -> None:
        if self.merged != expected:
            state = "not merged" if expected else "merged"
            raise ValueError(f"Cannot {action}: LoLDU layer {self.name!r} is {state}")


def add_loldu(
    model: nn.Module,
    target: Iterable[str] | Callable[[str, nn.Linear], bool],
    rank: int = 4,
    *,
    alpha: float | None = None,
    train_scale: bool = False,
    init: LoLDUInit = "lu",
    rtol: float | None = None,
) -> list[LoLDULinear]:
    """Replace chosen ``nn.Linear`` sub-modules of ``model`` by :class:`LoLDULinear`, in place.

    Targets are chosen exactly as :func:`~lorsum.add_lora` does. As there, only the adapted
    layers' own parameters are frozen; freeze the rest of the model yourself if only ``z`` should
    train (e.g. ``model.requires_grad_(False)`` before this call: ``z`` is created trainable).

    Args:
        model: the model to adapt (modified in place).
        target: the module names to adapt, exactly as ``model.named_modules()`` spells them, or a
            predicate ``(name, linear) -> bool``.
        rank, alpha, train_scale, init, rtol: as :class:`LoLDULinear`.

    Returns:
        The new layers, in the order of ``target`` (``named_modules`` order for a predicate).

    Raises:
        ValueError: a named target that does not exist, is not an ``nn.Linear``, or already sits
            inside a ``LoLDULinear``; no match; or an invalid ``rank`` (from the layer).
    """
    modules = dict(model.named_modules())
    linears = {name: m for name, m in modules.items() if isinstance(m, nn.Linear) and name}
    if callable(target):
        chosen = [name for name, m in linears.items() if target(name, m)]
    else:
        if isinstance(target, str):
            raise TypeError(f"target must be an iterable of names, got the string {target!r}")
        chosen = list(dict.fromkeys(target))
        for name in chosen:
            if name not in modules:
                raise ValueError(f"add_loldu: the model has no module named {name!r}")
            if not isinstance(modules[name], nn.Linear):
                raise ValueError(
                    f"add_loldu: {name!r} is a {type(modules[name]).__name__}, not an nn.Linear"
                )
    if not chosen:
        raise ValueError("add_loldu: no nn.Linear matched the target")
    # Validate every target before the first one is replaced, so that bad options leave the
    # model untouched.
    for name in chosen:
        if isinstance(model.get_submodule(name.rpartition(".")[0]), LoLDULinear):
            raise ValueError(f"add_loldu: {name!r} is already adapted by LoLDU")
        _check_options(linears[name], rank, alpha, init, rtol)
    layers = []
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        layer = LoLDULinear(
            linears[name],
            rank,
            alpha=alpha,
            train_scale=train_scale,
            init=init,
            rtol=rtol,
            name=name,
        )
        setattr(model.get_submodule(parent_name), child, layer)
        layers.append(layer)
    return layers


def loldu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable LoLDU tensors of ``model``: ``z`` (and ``scaling`` if trained) per layer.

    Keys are the ones ``model.state_dict()`` uses (``"<layer>.z"``, ``"<layer>.scaling"``), so
    the result is exactly ``model.state_dict()`` filtered to the direct parameters of the
    :class:`LoLDULinear` modules, and ``model.load_state_dict(state, strict=False)`` would also
    accept it. Tensors are detached copies; save them with ``torch.save`` or safetensors.

    ``z`` only means something relative to the factorisation of ``W0``: load it into a model
    built from the same base weights with the same :func:`add_loldu` arguments, on the same
    device type and dtype (partial pivoting is deterministic there; another LAPACK could break a
    near-tie between pivot candidates differently).

    Raises:
        ValueError: the model has no ``LoLDULinear`` layer.
    """
    state = {}
    for name, module in _loldu_layers(model):
        for pname, p in module.named_parameters(recurse=False):
            state[f"{name}.{pname}" if name else pname] = p.detach().clone()
    return state


@torch.no_grad()
def load_loldu_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a :func:`loldu_state_dict` into ``model``'s LoLDU layers (cast to their dtype).

    Strict: the keys must be exactly those :func:`loldu_state_dict` gives for ``model``, with the
    same shapes, and no layer may be merged (loading ``z`` would not update a merged weight).

    Raises:
        ValueError: no ``LoLDULinear`` layer, missing or unexpected keys, a shape mismatch, or a
            merged layer.
    """
    targets = {}
    for name, module in _loldu_layers(model):
        if module.merged:
            raise ValueError(f"load_loldu_state_dict: layer {name!r} is merged; unmerge it first")
        for pname, p in module.named_parameters(recurse=False):
            targets[f"{name}.{pname}" if name else pname] = p
    missing = sorted(targets.keys() - state.keys())
    unexpected = sorted(state.keys() - targets.keys())
    if missing or unexpected:
        raise ValueError(
            f"load_loldu_state_dict: missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, p in targets.items():
        value = state[key]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(
                f"load_loldu_state_dict: {key!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(p.shape)}"
            )
    for key, p in targets.items():
        p.copy_(state[key])


def _check_options(
    base: nn.Linear, rank: object, alpha: float | None, init: object, rtol: float | None
) -> float:
    """Validate the layer options; returns ``alpha`` as a float (``rank`` when ``None``)."""
    m, n = base.out_features, base.in_features
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(
            f"Invalid rank: {rank!r} (must be an int with 1 <= rank <= min(out_features, "
            f"in_features) = {min(m, n)})"
        )
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"Invalid alpha: {alpha} (must be > 0)")
    if init not in _INITS:
        raise ValueError(f"Invalid init: {init!r} (must be one of {_INITS})")
    if rtol is not None and not rtol >= 0:
        raise ValueError(f"Invalid rtol: {rtol} (must be >= 0)")
    return alpha


def _loldu_layers(model: nn.Module) -> list[tuple[str, LoLDULinear]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoLDULinear)]
    if not layers:
        raise ValueError("the model has no LoLDULinear layers; add them with add_loldu")
    return layers
