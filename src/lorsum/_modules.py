"""Choosing and replacing the ``nn.Linear`` layers of a model (shared by every ``add_*``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

LinearTarget = Iterable[str] | Callable[[str, nn.Linear], bool]


def select_linears(
    model: nn.Module, target: LinearTarget, caller: str
) -> list[tuple[str, nn.Linear]]:
    """The ``(name, layer)`` pairs that ``target`` names, in the order given (or, for a predicate
    ``(name, linear) -> bool``, in ``named_modules`` order).

    Raises:
        ValueError: a named target that does not exist or is not an ``nn.Linear``, or no match;
            the message starts with ``caller``.
    """
    if callable(target):
        chosen = [
            (name, m)
            for name, m in model.named_modules()
            if name and isinstance(m, nn.Linear) and target(name, m)
        ]
    else:
        modules = dict(model.named_modules())
        chosen = []
        for name in dict.fromkeys(target):
            if name not in modules:
                raise ValueError(f"{caller}: the model has no module named {name!r}")
            if not isinstance(modules[name], nn.Linear):
                raise ValueError(
                    f"{caller}: {name!r} is a {type(modules[name]).__name__}, not an nn.Linear"
                )
            chosen.append((name, modules[name]))
    if not chosen:
        raise ValueError(f"{caller}: no nn.Linear matched the target")
    return chosen


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model``'s sub-module ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
