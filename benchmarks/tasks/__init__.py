"""The tasks of ``lorsum compare``, by name.

A task is a module with ``VARIANTS``, ``METRIC`` and ``METRIC_MODE`` (``"min"`` or ``"max"``),
``NEEDS_DATA``, ``SIZES`` (``None`` for a single size), ``default_steps(variant, size)``,
``methods(variant)``, ``default_learning_rate(variant, method)``, ``extras(variant, entries)`` and
``train(variant, method, lr, seed, *, steps, device, progress[, data_dir, size])``.
"""

from benchmarks.tasks import glue, image, lm, squad, synthetic

TASKS = {"glue": glue, "image": image, "lm": lm, "squad": squad, "synthetic": synthetic}

__all__ = ["TASKS"]
