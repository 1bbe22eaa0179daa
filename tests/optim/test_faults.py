"""Faults do not corrupt state: a step whose gradient (and so whose captured rows) is not finite
leaves every LoRA factor and every per-pair state tensor (momentum, Adam moments) as it was,
counts ``skipped_steps``, and training continues from there exactly as if that step had never
happened. Also: ``torch.amp.GradScaler``'s inf check composes with the optimizers."""

from __future__ import annotations

import pytest
import torch

import lorsum
from tests.optim.test_common import IDS, OPTIMIZER_DB
from tests.utils import lora_layers, regression_batch, tiny_lora_model

# torch's own optimizers (adamw, sgd, LoRA+'s groups) make no promise about non-finite steps.
GUARDED = [(m, h) for m, h in OPTIMIZER_DB if m not in ("adamw", "sgd", "loraplus")]
GUARDED_IDS = [i for i, (m, _) in zip(IDS, OPTIMIZER_DB, strict=True) if m not in
               ("adamw", "sgd", "loraplus")]  # fmt: skip


def _build(method, hparams):
    model, _ = tiny_lora_model(seed=0)
    # dense_lr=0: the head (a dense group, stepped by torch's AdamW) stays fixed, so that the
    # comparison below is about the LoRA pairs only.
    return model, lorsum.create_optimizer(model, method, dense_lr=0.0, **hparams)


def _step(model, opt, x, y):
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    opt.step()


def _lora_factors(model):
    return [p.detach().clone() for m in lora_layers(model)
            for p in (m.lora_A.weight, m.lora_B.weight)]  # fmt: skip


def _lora_state(model, opt):
    """Every state tensor of every LoRA factor except the counters, cloned, keyed by name."""
    out = {}
    for i, layer in enumerate(lora_layers(model)):
        for which, p in (("A", layer.lora_A.weight), ("B", layer.lora_B.weight)):
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and key not in ("step", "skipped_steps"):
                    out[f"{i}.{which}.{key}"] = value.detach().clone()
    return out


def _skipped(model, opt):
    return [int(opt.state[m.lora_B.weight].get("skipped_steps", 0)) for m in lora_layers(model)]


@pytest.mark.parametrize(("method", "hparams"), GUARDED, ids=GUARDED_IDS)
@pytest.mark.parametrize("fault", ["nan", "inf"])
def test_a_non_finite_step_leaves_factors_and_state_untouched(method, hparams, fault):
    x, y = regression_batch(seed=1)
    model, opt = _build(method, hparams)
    for _ in range(3):
        _step(model, opt, x, y)
    factors, state = _lora_factors(model), _lora_state(model, opt)
    bad_y = y.clone()
    bad_y[0, 0] = float(fault)  # one bad target: every gradient and captured row is non-finite
    _step(model, opt, x, bad_y)
    after = _lora_factors(model)
    assert all(torch.equal(a, b) for a, b in zip(after, factors, strict=True)), method
    after_state = _lora_state(model, opt)
    assert after_state.keys() == state.keys()
    changed = [k for k in state if not torch.equal(after_state[k], state[k])]
    assert not changed, f"{method} {hparams}: state corrupted by a {fault} step: {changed}"
    assert _skipped(model, opt) == [1, 1]
    _step(model, opt, x, y)  # and it trains on, finite
    assert all(torch.isfinite(p).all() for p in _lora_factors(model))


@pytest.mark.parametrize(("method", "hparams"), GUARDED, ids=GUARDED_IDS)
def test_gradscaler_skips_the_inf_step_and_training_continues(method, hparams):
    """GradScaler (here on CPU, float64) unscales the LoRA ``.grad`` and skips ``opt.step`` when
    it finds an inf; the captured rows are dropped on the next zero_grad. No factor is touched."""
    x, y = regression_batch(seed=1)
    model, opt = _build(method, hparams)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i in range(4):
        opt.zero_grad()
        target = y.clone()
        if i == 2:
            target[0, 0] = float("inf")
        before = _lora_factors(model)
        scaler.scale((model(x) - target).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        after = _lora_factors(model)
        if i == 2:
            assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
        else:
            assert not all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
        assert all(torch.isfinite(p).all() for p in after)
    assert scaler.get_scale() < 2.0**8  # the inf was seen, and the scale backed off
