"""PrecondLoRA's stacked step (``foreach=True``): same-shape pairs stepped at once, as if alone."""

from __future__ import annotations

import pytest
import torch

import lorsum
from tests.optim.stacks import record_stack_sizes, three_plus_one

W = 24


def _model():
    return three_plus_one(W, 5)


def _train(foreach, hparams, *, steps=4, frozen_at=None, poison=None):
    """Train ``steps`` steps; pair 1's layer is bypassed at step ``frozen_at`` (no gradient) and
    pair 1's ``B.grad`` is made infinite at the last step when ``poison``."""
    model = _model()
    hparams = dict(hparams)
    method = "precond_" + hparams.pop("base", "adamw")
    opt = lorsum.create_optimizer(model, method, foreach=foreach, **hparams)
    pairs = lorsum.find_lora_pairs(model)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(8, W, generator=g, dtype=torch.float64)
        y = torch.randn(8, 5, generator=g, dtype=torch.float64)
        h = torch.tanh(model[0](x))
        h = h if step == frozen_at else torch.tanh(model[2](h))
        out = model[6](torch.tanh(model[4](h)))
        (out - y).square().mean().backward()
        if poison and step == steps - 1:
            pairs[1].B.grad[0, 0] = float("inf")
        opt.step()
        opt.zero_grad()
    return model, opt


def _values(model, opt):
    """Every factor and every moment the optimizer holds, in a fixed order."""
    out = []
    for pair in lorsum.find_lora_pairs(model):
        for p in (pair.A, pair.B):
            out.append(p.detach().clone())
            out += [
                opt.state[p][k].clone()
                for k in sorted(opt.state[p])
                if k not in ("step", "skipped_steps")
            ]
    return out


@pytest.mark.parametrize(
    "hparams",
    [
        {"lr": 0.05, "base": "adamw", "weight_decay": 0.01},
        {"lr": 0.05, "base": "adamw", "order": "sequential", "max_grad_norm": 0.5},
        {"lr": 0.1, "base": "sgd", "momentum": 0.9, "weight_decay": 0.01},
        {"lr": 0.1, "base": "sgd", "order": "sequential", "damping": 0.1},
    ],
)
def test_a_stacked_step_equals_the_pair_by_pair_step(hparams):
    # frozen_at: pair 1 gets no gradient at step 1, so its Adam count lags its stack-mates'.
    stacked = _values(*_train(True, hparams, frozen_at=1))
    alone = _values(*_train(False, hparams, frozen_at=1))
    assert len(stacked) == len(alone)
    for a, b in zip(stacked, alone, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_non_finite_pair_is_skipped_alone_in_its_stack():
    hparams = {"lr": 0.05, "base": "adamw"}
    clean = _values(*_train(True, hparams, steps=3))
    poisoned_model, opt = _train(True, hparams, steps=4, poison=True)
    poisoned = _values(poisoned_model, opt)
    per_pair = len(clean) // 4
    # Pair 1 (the second 24→24 layer) kept its factors and moments from step 3.
    for a, b in zip(poisoned[per_pair : 2 * per_pair], clean[per_pair : 2 * per_pair], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(poisoned[0], clean[0])  # its stack-mates moved on
    skipped = [int(opt.state[p.B]["skipped_steps"]) for p in lorsum.find_lora_pairs(poisoned_model)]
    assert skipped == [0, 1, 0, 0]


def test_same_shape_pairs_form_one_stack(monkeypatch):
    sizes = record_stack_sizes(monkeypatch, lorsum.PrecondLoRA)
    _train(True, {"lr": 0.05}, steps=1)
    assert sorted(sizes) == [1, 3]
    sizes.clear()
    _train(False, {"lr": 0.05}, steps=1)
    assert sizes == [1, 1, 1, 1]


def test_foreach_must_be_a_bool():
    with pytest.raises(ValueError, match="Invalid foreach: 1"):
        lorsum.create_optimizer(_model(), "precond_sgd", foreach=1)
