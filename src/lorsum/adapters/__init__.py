"""Parameterisations of the weight update other than a LoRA pair ``B @ A``.

Each adapter is a module that wraps a frozen linear layer, with an exact ``merge``/``unmerge``,
a function that injects it into a model, and a trainable-parameter count that matches its
paper's formula.
"""
