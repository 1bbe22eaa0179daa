"""The optimizers against the math, in float64 on LoRALinear models: LoRSum's many-sweep limit
is SVDLoRA's step, its Jacobi pass is PrecondLoRA-SGD, one sweep is the Gauss–Seidel closed form,
the step does not depend on the LoRA scale, the momentum's exact limit is torch's heavy-ball SGD,
accumulation and checkpointing change nothing, clipping uses the factored full-gradient norm,
loss scaling is undone, and non-finite steps leave the factors untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorsum
from lorsum import GradientCapture, LoRSum, PrecondLoRA, SVDLoRA, pair_param_groups
from tests import reference as ref
from tests.utils import (
    adapter_products,
    full_weight_gradients,
    lora_layers,
    mse,
    regression_batch,
    tiny_lora_model,
)


def _step(model, pairs, x, y, cls, *, micro_batches=1, use_checkpoint=None, **kwargs):
    """One optimizer step of ``cls`` on ``model`` (LoRA groups only); returns the optimizer."""
    with GradientCapture(pairs) as capture:
        if cls.needs_capture:
            kwargs["capture"] = capture
        opt = cls(pair_param_groups(pairs), **kwargs)
        for xb, yb in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
            if use_checkpoint is None:
                out = model(xb)
            else:
                out = checkpoint(model, xb, use_reentrant=use_checkpoint)
            ((out - yb).square().mean() / micro_batches).backward()
        opt.step()
    return opt


def test_many_sweeps_with_vanishing_damping_take_the_svdlora_step():
    model, pairs = tiny_lora_model(seed=1, alpha=6.0)  # s = 2
    x, y = regression_batch(seed=2)
    svd_model = copy.deepcopy(model)
    lr = 0.3
    grads = full_weight_gradients(model, x, y)
    expected = [
        ref.best_rank(P - lr * G, 3) for P, G in zip(adapter_products(model), grads, strict=True)
    ]
    _step(model, pairs, x, y, LoRSum, lr=lr, num_iters=300, damping=1e-12)
    _step(svd_model, lorsum.lora_pairs(svd_model), x, y, SVDLoRA, lr=lr)
    for ours, svd, oracle in zip(
        adapter_products(model), adapter_products(svd_model), expected, strict=True
    ):
        assert ref.rel_err(svd, oracle) <= 1e-10
        assert ref.rel_err(ours, oracle) <= 1e-6


@pytest.mark.parametrize("alpha", [3.0, 12.0])  # s = 1 and s = 4
def test_jacobi_pass_is_the_precondlora_sgd_step(alpha):
    model, pairs = tiny_lora_model(seed=3, alpha=alpha)
    x, y = regression_batch(seed=4)
    twin = copy.deepcopy(model)
    s, lr, damping = pairs[0].scaling, 0.2, 0.05
    _step(model, pairs, x, y, LoRSum, lr=lr, num_iters=0, damping=damping)
    # LoRSum moves sBA by −lr·∂L/∂W; in factor units that is SGD with lr/s² on autograd's
    # gradients (which carry s), preconditioned with δ = damping·lr/s.
    _step(twin, lorsum.lora_pairs(twin), x, y, PrecondLoRA,
          lr=lr / s**2, base="sgd", damping=damping * lr / s)  # fmt: skip
    for ours, theirs in zip(pairs, lorsum.lora_pairs(twin), strict=True):
        assert ref.rel_err(ours.A, theirs.A) <= 1e-10
        assert ref.rel_err(ours.B, theirs.B) <= 1e-10


def test_one_sweep_is_the_gauss_seidel_closed_form():
    model, pairs = tiny_lora_model(seed=5, alpha=6.0)
    x, y = regression_batch(seed=6)
    s, lr, damping = pairs[0].scaling, 0.2, 0.05
    grads = full_weight_gradients(model, x, y)
    before = [(p.B.detach().clone(), p.A.detach().clone()) for p in pairs]
    _step(model, pairs, x, y, LoRSum, lr=lr, num_iters=1, damping=damping)
    for pair, (B0, A0), G in zip(pairs, before, grads, strict=True):
        # Product units: B'A' ≈ B0A0 − (lr/s)·∂L/∂W with λ = damping·lr/s.
        B1, A1 = ref.gauss_seidel_sweep(B0, A0, G, lr / s, damping * lr / s)
        assert ref.rel_err(pair.A, A1) <= 1e-10
        assert ref.rel_err(pair.B, B1) <= 1e-10


@pytest.mark.parametrize(("cls", "kwargs"), [
    (LoRSum, {"num_iters": 2, "damping": 1e-3, "momentum": 0.9, "weight_decay": 0.1}),
    (SVDLoRA, {"momentum": 0.9, "weight_decay": 0.1}),
])  # fmt: skip
def test_the_step_does_not_depend_on_the_lora_scale(cls, kwargs):
    x, y = regression_batch(seed=7)
    trajectories = []
    for alpha in (3.0, 12.0):  # s = 1 and s = 4, with factors rescaled to the same W
        model, pairs = tiny_lora_model(seed=8, alpha=3.0)
        for layer in lora_layers(model):
            layer.scaling = alpha / 3
            with torch.no_grad():
                layer.lora_A.weight.div_(layer.scaling**0.5)
                layer.lora_B.weight.div_(layer.scaling**0.5)
        pairs = lorsum.lora_pairs(model)
        with GradientCapture(pairs) as capture:
            opt = cls(pair_param_groups(pairs), lr=0.1, capture=capture, **kwargs)
            for _ in range(3):
                opt.zero_grad()
                mse(model, x, y).backward()
                opt.step()
        trajectories.append(adapter_products(model))
    for one, four in zip(*trajectories, strict=True):
        assert ref.rel_err(four, one) <= 1e-9


def test_momentum_in_the_exact_limit_is_torch_heavy_ball_sgd_on_w():
    # Full rank r = min(m, n), momentum rank = r, many sweeps, no damping: projected heavy-ball
    # SGD with nothing to project, i.e. torch.optim.SGD(momentum=β) on the dense W (spec D.22).
    torch.manual_seed(0)
    layer = nn.Linear(8, 6).double()
    model = nn.Sequential(layer)
    pairs = lorsum.add_lora(model, ["0"], rank=6)
    with torch.no_grad():
        pairs[0].B.copy_(torch.randn(6, 6, dtype=torch.float64) * 0.5)
    dense = nn.Linear(8, 6).double()
    with torch.no_grad():
        dense.weight.copy_(lora_layers(model)[0].merged_weight())
        dense.bias.copy_(layer.bias)
    dense.bias.requires_grad_(False)
    reference = torch.optim.SGD([dense.weight], lr=0.05, momentum=0.8)
    x, y = torch.randn(40, 8, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    with GradientCapture(pairs) as capture:
        opt = LoRSum(pair_param_groups(pairs), lr=0.05, num_iters=60, damping=0.0,
                     momentum=0.8, capture=capture)  # fmt: skip
        for _ in range(5):
            opt.zero_grad()
            reference.zero_grad()
            mse(model, x, y).backward()
            (dense(x) - y).square().mean().backward()
            opt.step()
            reference.step()
            assert ref.rel_err(lora_layers(model)[0].merged_weight(), dense.weight) <= 1e-8


@pytest.mark.parametrize(("cls", "kwargs"), [
    (LoRSum, {"num_iters": 2, "damping": 1e-3, "momentum": 0.9}),
    (SVDLoRA, {}),
])  # fmt: skip
def test_four_accumulated_micro_batches_equal_one_batch_of_four(cls, kwargs):
    x, y = regression_batch(rows=64, seed=9)
    results = []
    for micro in (1, 4):
        model, pairs = tiny_lora_model(seed=10)
        _step(model, pairs, x, y, cls, micro_batches=micro, lr=0.1, **kwargs)
        results.append([p.detach().clone() for pair in pairs for p in (pair.A, pair.B)])
    for one, four in zip(*results, strict=True):
        assert ref.rel_err(four, one) <= 1e-10


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_changes_nothing(use_reentrant):
    x, y = regression_batch(seed=11)
    x.requires_grad_(use_reentrant)  # reentrant checkpointing needs an input that requires grad
    results = []
    for mode in (None, use_reentrant):
        model, pairs = tiny_lora_model(seed=12)
        _step(model, pairs, x, y, LoRSum, use_checkpoint=mode, lr=0.1, num_iters=2, damping=1e-3)
        results.append([p.detach().clone() for pair in pairs for p in (pair.A, pair.B)])
    for plain, checkpointed in zip(*results, strict=True):
        assert ref.rel_err(checkpointed, plain) <= 1e-12


def test_clipping_uses_the_global_norm_of_the_full_gradients():
    model, pairs = tiny_lora_model(seed=13)
    x, y = regression_batch(seed=14)
    grads = full_weight_gradients(model, x, y)
    twin = copy.deepcopy(model)
    total = torch.sqrt(sum(g.square().sum() for g in grads))
    max_norm = 0.1 * float(total)
    with GradientCapture(pairs) as capture:
        opt = LoRSum(pair_param_groups(pairs), lr=0.2, damping=0.0, capture=capture,
                     max_grad_norm=max_norm)  # fmt: skip
        mse(model, x, y).backward()
        opt.step()
    # The same step with the learning rate scaled by the clip coefficient instead (no damping:
    # LoRSum's damping scales with the learning rate, which would change the problem).
    coef = max_norm / (float(total) + 1e-6)
    _step(twin, lorsum.lora_pairs(twin), x, y, LoRSum, lr=0.2 * coef, damping=0.0)
    for a, b in zip(pairs, lorsum.lora_pairs(twin), strict=True):
        assert ref.rel_err(a.A, b.A) <= 1e-10
        assert ref.rel_err(a.B, b.B) <= 1e-10


def test_loss_scaling_is_undone_and_an_overflowing_step_is_skipped_cleanly():
    x, y = regression_batch(seed=15)
    results = []
    for scaled in (False, True):
        model, pairs = tiny_lora_model(seed=16)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        with GradientCapture(pairs, grad_scaler=scaler if scaled else None) as capture:
            opt = LoRSum(pair_param_groups(pairs), lr=0.1, capture=capture, num_iters=1)
            if scaled:  # an overflow first: the scaler skips the step, the rows must not leak
                before = [p.detach().clone() for pair in pairs for p in (pair.A, pair.B)]
                scaler.scale(mse(model, x * float("inf"), y)).backward()
                scaler.step(opt)
                scaler.update()
                after = [p.detach().clone() for pair in pairs for p in (pair.A, pair.B)]
                assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
                opt.zero_grad()
            for _ in range(2):
                scaler.scale(mse(model, x, y)).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
        results.append([p.detach().clone() for pair in pairs for p in (pair.A, pair.B)])
    for plain, scaled in zip(*results, strict=True):
        assert ref.rel_err(scaled, plain) <= 1e-12


def test_non_finite_gradients_never_reach_the_factors():
    model, pairs = tiny_lora_model(seed=17)
    x, y = regression_batch(seed=18)
    before = [p.detach().clone() for pair in pairs for p in (pair.A, pair.B)]
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    opt = _step(model, pairs, x_bad, y, LoRSum, lr=0.1)
    after = [p.detach().clone() for pair in pairs for p in (pair.A, pair.B)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert int(opt.state[pairs[0].B]["skipped_steps"]) == 1
