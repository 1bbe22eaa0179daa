"""Shared pieces of the stacked-step tests: a model whose adapters form one stack of three and a
stack of one, and a spy that records the size of every stack an optimizer steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorsum


def three_plus_one(width: int, out: int, *, alpha: float | None = None, seed: int = 0) -> nn.Module:
    """Three ``width → width`` adapted layers (one stack) and one ``width → out`` (its own), in
    float64, rank 3, with ``B`` drawn non-zero as after the first steps of training."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out),
    ).double()  # fmt: skip
    scale = {} if alpha is None else {"alpha": alpha}
    lorsum.add_lora(model, ["0", "2", "4", "6"], rank=3, **scale)
    with torch.no_grad():
        for pair in lorsum.find_lora_pairs(model):
            pair.B.normal_(std=0.3)
    return model


def record_stack_sizes(monkeypatch: pytest.MonkeyPatch, optimizer: type) -> list[int]:
    """The size of every stack ``optimizer`` steps from now on, in order (through its
    ``_step_stack``, which each stacking optimizer has)."""
    sizes: list[int] = []
    original = optimizer._step_stack

    def spy(self, members):
        sizes.append(len(members))
        return original(self, members)

    monkeypatch.setattr(optimizer, "_step_stack", spy)
    return sizes
