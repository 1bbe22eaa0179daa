"""Integrations with PEFT (:mod:`lorsum.integrations.peft`) and the transformers ``Trainer``
(:mod:`lorsum.integrations.transformers`).

Each submodule imports its library inside its functions, so importing this package is cheap and
needs neither ``peft`` nor ``transformers`` (install them with ``pip install lorsum[peft]``).
"""

__all__: list[str] = []
