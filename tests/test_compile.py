"""``torch.compile`` on a model with a gradient capture: the same training as eager.

The capture's forward hooks keep Python state, so dynamo breaks the graph around every adapted
layer (two breaks per layer, counted below): compiling still works, and helps only inside the
stretches between adapters. What is checked here is that nothing is lost: the factors after a
few compiled steps equal the eager ones, with ``step()`` and with stepping in backward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorsum

pytest.importorskip("torch._dynamo")


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )
    lorsum.add_lora(model, ["0", "2"], rank=2)
    with torch.no_grad():
        for pair in lorsum.find_lora_pairs(model):
            pair.B.normal_(std=0.1)
    return model


def _train(compiled, step_in_backward):
    model = _model()
    opt = lorsum.create_optimizer(model, "lorsum", lr=0.1, step_in_backward=step_in_backward)
    forward = torch.compile(model) if compiled else model
    x, y = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(32, 4)
    for _ in range(3):
        (forward(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
    opt.capture.remove()
    return [p.detach() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_a_compiled_model_trains_like_the_eager_one(step_in_backward):
    torch._dynamo.reset()
    compiled = _train(True, step_in_backward)
    eager = _train(False, step_in_backward)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_capture_breaks_the_graph_twice_per_adapted_layer():
    model = _model()
    x = torch.randn(8, 16)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x).graph_break_count == 0  # LoRALinear alone: one graph
    capture = lorsum.GradientCapture(lorsum.find_lora_pairs(model))
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x).graph_break_count == 4
    capture.remove()
