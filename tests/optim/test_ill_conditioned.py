"""Ill-conditioned problems at the optimizer level: a zero gradient, rank-deficient factors
(including PEFT's ``B = 0`` start) with no damping, a huge learning rate and a metric near zero.
Each step stays finite (or is skipped and counted), never falls back to an identity silently,
and where the exact answer is known it is the answer. The r × r solves behind them are tested
in ``tests/functional/test_linalg.py`` (null-space anchor, zero Gram, indefinite Gram → NaN,
eigh failure → NaN)."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorsum
from tests.optim.test_faults import GUARDED, GUARDED_IDS
from tests.utils import adapter_products, lora_layers, regression_batch, tiny_lora_model


def _step(model, opt, x, y, *, scale=1.0):
    opt.zero_grad()
    (scale * (model(x) - y)).square().mean().backward()
    opt.step()


def _factors(model):
    return [p.detach().clone() for m in lora_layers(model) for p in (m.lora_A.weight,
                                                                      m.lora_B.weight)]  # fmt: skip


@pytest.mark.parametrize(("method", "hparams"), GUARDED, ids=GUARDED_IDS)
def test_a_zero_gradient_leaves_the_adapter_where_it_is(method, hparams):
    model, _ = tiny_lora_model()
    opt = lorsum.create_optimizer(model, method, dense_lr=0.0, **{**hparams, "lr": 0.1})
    x, y = regression_batch(seed=1)
    before = adapter_products(model)
    _step(model, opt, x, y, scale=0.0)  # the loss is identically 0: G = 0 for every layer
    # Decoupled decay acts on s·BA alone; the damped fit of the decayed product is pulled towards
    # the current factors by O(damping · lr · wd), hence the looser bound when there is decay.
    decay = 1.0 - 0.1 * hparams.get("weight_decay", 0.0)
    rtol, atol = (1e-10, 1e-12) if decay == 1.0 else (1e-7, 1e-9)
    for a, b in zip(adapter_products(model), before, strict=True):
        torch.testing.assert_close(a, decay * b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("method", ["lorsum", "scaled_lorsum", "precond_sgd"])
def test_peft_s_zero_b_start_with_no_damping_takes_a_finite_descent_step(method):
    model, pairs = tiny_lora_model()
    with torch.no_grad():
        for pair in pairs:
            pair.B.zero_()  # B = 0: every Gram B^T B is singular
    damping = {"precond_sgd": 1e-12}.get(method, 0.0)  # PrecondLoRA needs δ > 0 by design
    opt = lorsum.create_optimizer(model, method, lr=0.1, damping=damping, dense_lr=0.0)
    x, y = regression_batch(seed=1)
    loss = (model(x) - y).square().mean().item()
    _step(model, opt, x, y)
    assert all(torch.isfinite(t).all() for t in _factors(model))
    assert (model(x) - y).square().mean().item() < loss


def test_lorsum_with_a_rank_deficient_b_keeps_a_along_the_missing_direction():
    # B's second column is zero and damping is 0: the A-solve sees nothing along it and must
    # keep A0's row there (the λ → 0⁺ limit), not replace it by noise or zeros.
    model, pairs = tiny_lora_model()
    with torch.no_grad():
        pairs[0].B[:, 1] = 0.0
    row_before = pairs[0].A[1].detach().clone()
    opt = lorsum.create_optimizer(model, "lorsum", lr=0.1, damping=0.0, num_iters=0)
    x, y = regression_batch(seed=1)
    _step(model, opt, x, y)
    torch.testing.assert_close(pairs[0].A[1].detach(), row_before, rtol=1e-12, atol=1e-14)
    assert all(torch.isfinite(t).all() for t in _factors(model))


@pytest.mark.parametrize(("method", "hparams"), GUARDED, ids=GUARDED_IDS)
def test_a_huge_learning_rate_never_writes_a_non_finite_factor(method, hparams):
    model, _ = tiny_lora_model()
    opt = lorsum.create_optimizer(model, method, dense_lr=0.0, **{**hparams, "lr": 1e30})
    x, y = regression_batch(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflowing steps are skipped, loudly
        for _ in range(3):
            _step(model, opt, x, y)
    assert all(torch.isfinite(t).all() for t in _factors(model)), method


@pytest.mark.parametrize("metric", ["kfac", "shampoo"])
@pytest.mark.parametrize("form", ["diagonal", "dense"])
def test_a_metric_near_zero_is_floored_by_its_damping(metric, form):
    # Inputs of size 1e-150: every K-FAC or Shampoo statistic is ~1e-300 or underflows to 0.
    # metric_damping floors the metric, so the step is finite and moves the adapter.
    model, _ = tiny_lora_model()
    opt = lorsum.create_optimizer(
        model, "scaled_lorsum", lr=0.1, metric=metric, metric_form=form, dense_lr=0.0
    )
    x, y = regression_batch(seed=1)
    before = adapter_products(model)
    _step(model, opt, 1e-150 * x, y)
    after = adapter_products(model)
    assert all(torch.isfinite(t).all() for t in _factors(model))
    assert [int(opt.state[m.lora_B.weight]["skipped_steps"]) for m in lora_layers(model)] == [0, 0]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
