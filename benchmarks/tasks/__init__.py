"""The tasks of ``lorsum compare``, by name.

A task is a module with ``VARIANTS``, ``STEPS`` (per variant), ``METRIC`` (lower is better),
``NEEDS_DATA``, ``methods(variant)``, ``default_learning_rate(variant, method)``,
``train(variant, method, lr, seed, *, steps, device, progress)`` and ``extras(variant, entries)``.
"""

from benchmarks.tasks import synthetic

TASKS = {"synthetic": synthetic}

__all__ = ["TASKS"]
