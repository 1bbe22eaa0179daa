"""The LoRAPro optimizer on float64 LoRALinear models (spec related-methods §1.7).

Covers: the ``"sgd"`` step is exactly the adjusted-gradient step, whose first-order W change is
the tangent projection of G; the first ``"full_adam"`` step uses the standard t = 1, so it moves W
by −lr·Proj_T(≈ sign(g̃)) up to an error that scales as lr²; the m×n state and its checkpoint
(bitwise ``state_dict`` round trip through ``torch.load(weights_only=True)``); decoupled weight
decay of s·BA in W space; PEFT's B = 0 init; missing and non-finite gradients; dtypes; descent;
and every ValueError.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import lorsum
from lorsum import pair_param_groups
from lorsum.optim.lora_pro import LoRAPro
from tests import reference as ref
from tests.utils import (
    adapter_products,
    full_weight_gradients,
    mse,
    regression_batch,
    tiny_lora_model,
)

F64 = torch.float64


def _tangent_projection(A, B, G):
    P_B = B @ torch.linalg.solve(B.T @ B, B.T)
    P_A = A.T @ torch.linalg.solve(A @ A.T, A)
    return P_B @ G + G @ P_A - P_B @ G @ P_A


def _backward(model, x, y):
    model.zero_grad(set_to_none=True)
    mse(model, x, y).backward()


def _setup(seed=0, alpha=6.0, **kwargs):
    """A tiny model (s = 2 by default), a batch, and a LoRAPro over its two pairs."""
    model, pairs = tiny_lora_model(seed=seed, alpha=alpha)
    x, y = regression_batch(seed=seed + 1)
    return model, pairs, x, y, LoRAPro(pair_param_groups(pairs), **kwargs)


# --- the update rule ---------------------------------------------------------------------------


def test_sgd_step_is_the_adjusted_gradient_step():
    lr = 0.1
    model, pairs, x, y, opt = _setup(mode="sgd", lr=lr, damping=0.0)
    grads = full_weight_gradients(model, x, y)
    before = [(p.A.detach().clone(), p.B.detach().clone()) for p in pairs]
    _backward(model, x, y)
    opt.step()
    for pair, (A, B), G in zip(pairs, before, grads, strict=True):
        s = pair.scaling
        # W changes by −lr·g̃ + lr²·s·g_B g_A exactly; g̃ is the tangent projection of G.
        g_A, g_B = lorsum.functional.lora_pro_gradients(
            A, B, s * B.T @ G, s * G @ A.T, scaling=s, damping=0.0
        )
        assert ref.rel_err(pair.A, A - lr * g_A) <= 1e-12
        assert ref.rel_err(pair.B, B - lr * g_B) <= 1e-12
        change = s * pair.B.detach() @ pair.A.detach() - s * B @ A
        expected = -lr * _tangent_projection(A, B, G) + lr**2 * s * g_B @ g_A
        assert ref.rel_err(change, expected) <= 1e-10


def test_sgd_step_does_not_depend_on_the_lora_scale():
    lr = 0.05
    changes = []
    for alpha in (3.0, 12.0):  # s = 1 and s = 4, same W = W0 + sBA at the start
        model, pairs = tiny_lora_model(seed=2, alpha=alpha)
        with torch.no_grad():
            for pair in pairs:  # the same product s·BA for both scales
                pair.B.mul_(3.0 / alpha)
        x, y = regression_batch(seed=3)
        start = adapter_products(model)
        opt = LoRAPro(pair_param_groups(pairs), mode="sgd", lr=lr, damping=0.0)
        _backward(model, x, y)
        opt.step()
        changes.append([new - old for new, old in zip(adapter_products(model), start, strict=True)])
    for one, four in zip(*changes, strict=True):
        # First order is scale-free; the lr² term s·g_B g_A is not (it scales as 1/s).
        assert ref.rel_err(one, four) <= 5e-2
        assert ref.rel_err(one, four) >= 1e-8


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)])
def test_first_full_adam_step_is_the_projected_sign_step_to_second_order(betas):
    eps = 1e-8
    errors = []
    for lr in (1e-3, 1e-4):
        model, pairs, x, y, opt = _setup(seed=4, lr=lr, betas=betas, eps=eps, damping=0.0)
        grads = full_weight_gradients(model, x, y)
        factors = [(p.A.detach().clone(), p.B.detach().clone()) for p in pairs]
        start = adapter_products(model)
        _backward(model, x, y)
        opt.step()
        error = 0.0
        for pair, (A, B), G, old, new in zip(
            pairs, factors, grads, start, adapter_products(model), strict=True
        ):
            g_eq = _tangent_projection(A, B, G)
            state = opt.state[pair.B]
            assert ref.rel_err(state["exp_avg"], (1 - betas[0]) * g_eq) <= 1e-12
            assert ref.rel_err(state["exp_avg_sq"], (1 - betas[1]) * g_eq.square()) <= 1e-12
            # Standard t = 1: Δ = g̃/(|g̃| + ε) ≈ sign(g̃), not the official 0.745·sign(g̃).
            # It differs from the sign by ε/|g̃| entrywise: |g̃| is 5e-5 to 1e-1 on this model.
            delta = g_eq / (g_eq.abs() + eps)
            assert g_eq.abs().min() >= 5e-5
            assert ref.rel_err(delta, g_eq.sign()) <= 1e-4
            error += float((new - old + lr * _tangent_projection(A, B, delta)).norm())
        errors.append(error)
    # The error is lr²·‖s d_B d_A‖ exactly (plus rounding): a tenth of lr, a hundredth of error.
    ratio = errors[0] / errors[1]
    assert abs(ratio / 100 - 1) <= 1e-3, f"error ratio {ratio:.6g} for lr ratio 10 (expected 100)"


def test_full_adam_matches_the_functional_step_over_several_steps():
    lr, betas = 1e-2, (0.8, 0.95)
    model, pairs, x, y, opt = _setup(seed=5, lr=lr, betas=betas)
    A, B = pairs[0].A.detach().clone(), pairs[0].B.detach().clone()
    M = V = torch.zeros(B.shape[0], A.shape[1], dtype=F64)
    for t in (1, 2, 3):
        _backward(model, x, y)
        grad_A, grad_B = pairs[0].A.grad.clone(), pairs[0].B.grad.clone()
        opt.step()
        d_A, d_B, M, V = lorsum.functional.lora_pro_adam(
            A, B, grad_A, grad_B, M, V,
            step=t, scaling=2.0, betas=betas, eps=1e-8, damping=1e-8,
        )  # fmt: skip
        A, B = A - lr * d_A, B - lr * d_B
        assert torch.equal(pairs[0].A, A)
        assert torch.equal(pairs[0].B, B)
        assert torch.equal(opt.state[pairs[0].B]["exp_avg"], M)
        assert float(opt.state[pairs[0].B]["step"]) == t


@pytest.mark.parametrize("mode", ["full_adam", "sgd"])
def test_weight_decay_shrinks_the_adapter_product_in_w_space(mode):
    lr, wd = 0.05, 0.4
    products = []
    for weight_decay in (0.0, wd):
        model, _, x, y, opt = _setup(seed=6, mode=mode, lr=lr, weight_decay=weight_decay)
        _backward(model, x, y)
        opt.step()
        products.append(adapter_products(model))
    for plain, decayed in zip(*products, strict=True):
        assert ref.rel_err(decayed, (1 - lr * wd) * plain) <= 1e-12


# --- state and checkpoints ----------------------------------------------------------------------


def test_full_adam_state_is_full_size():
    model, pairs, x, y, opt = _setup(seed=7)
    _backward(model, x, y)
    opt.step()
    for pair in pairs:
        m, n = pair.shape
        state = opt.state[pair.B]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (m, n)
        assert state["exp_avg"].dtype == pair.B.dtype
        assert state["step"].shape == ()
        assert state["step"].dtype == torch.float32
        assert state["step"].device.type == "cpu"
        assert float(state["step"]) == 1
        assert not opt.state[pair.A]  # all per-pair state is keyed by B


def test_sgd_mode_keeps_no_full_size_state():
    model, pairs, x, y, opt = _setup(seed=8, mode="sgd", lr=0.1)
    _backward(model, x, y)
    opt.step()
    for pair in pairs:
        assert "exp_avg" not in opt.state[pair.B]
        assert all(t.numel() == 1 for t in opt.state[pair.B].values())


@pytest.mark.parametrize("mode", ["full_adam", "sgd"])
def test_state_dict_round_trip_is_bitwise(mode):
    kwargs = {"mode": mode, "lr": 1e-2, "weight_decay": 0.1}
    model, _, x, y, opt = _setup(seed=9, **kwargs)
    twin = copy.deepcopy(model)
    for _ in range(4):
        _backward(model, x, y)
        opt.step()

    twin_pairs = lorsum.lora_pairs(twin)
    first = LoRAPro(pair_param_groups(twin_pairs), **kwargs)
    for _ in range(2):
        _backward(twin, x, y)
        first.step()
    buffer = io.BytesIO()
    torch.save({"model": twin.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, _ = tiny_lora_model(seed=123, alpha=6.0)  # different values, same structure
    resumed_model.load_state_dict(saved["model"])
    resumed = LoRAPro(pair_param_groups(lorsum.lora_pairs(resumed_model)), **kwargs)
    resumed.load_state_dict(saved["optimizer"])
    for _ in range(2):
        _backward(resumed_model, x, y)
        resumed.step()
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


# --- edge cases --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full_adam", "sgd"])
def test_peft_init_b_zero_moves_only_b(mode):
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
    model = model.to(F64)
    pairs = lorsum.add_lora(model, ["0", "2"], rank=3, alpha=6.0)  # B = 0
    x, y = regression_batch(seed=11)
    A0 = [p.A.detach().clone() for p in pairs]
    opt = LoRAPro(pair_param_groups(pairs), mode=mode, lr=1e-2)
    _backward(model, x, y)
    opt.step()
    for pair, A in zip(pairs, A0, strict=True):
        assert torch.equal(pair.A, A)  # ∇_A = 0 at B = 0, so X = 0 and g_A = 0
        assert torch.isfinite(pair.B).all()
        assert pair.B.abs().sum() > 0
        assert int(opt.state[pair.B]["skipped_steps"]) == 0


def test_pair_without_gradients_is_skipped():
    model, pairs, x, y, opt = _setup(seed=12)
    before = [p.detach().clone() for p in (pairs[0].A, pairs[0].B)]
    _backward(model, x, y)
    pairs[0].A.grad = pairs[0].B.grad = None
    opt.step()
    assert torch.equal(pairs[0].A, before[0])
    assert torch.equal(pairs[0].B, before[1])
    assert not opt.state[pairs[0].B]
    assert float(opt.state[pairs[1].B]["step"]) == 1


def test_one_missing_gradient_counts_as_zero():
    results = []
    for missing in (True, False):
        model, pairs, x, y, opt = _setup(seed=13, mode="sgd", lr=0.1)
        _backward(model, x, y)
        if missing:
            pairs[0].A.grad = None
        else:
            pairs[0].A.grad.zero_()
        opt.step()
        results.append([p.detach().clone() for p in (pairs[0].A, pairs[0].B)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_non_finite_gradient_leaves_factors_and_moments_untouched():
    model, pairs, x, y, opt = _setup(seed=14)
    _backward(model, x, y)
    opt.step()
    state = opt.state[pairs[0].B]
    saved = [t.clone() for t in (pairs[0].A, pairs[0].B, state["exp_avg"], state["exp_avg_sq"])]
    _backward(model, x, y)
    pairs[0].B.grad[0, 0] = float("nan")
    opt.step()
    after = (pairs[0].A, pairs[0].B, state["exp_avg"], state["exp_avg_sq"])
    for old, new in zip(saved, after, strict=True):
        assert torch.equal(old, new)
    assert int(state["skipped_steps"]) == 1
    assert int(opt.state[pairs[1].B]["skipped_steps"]) == 0  # the other pair stepped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_and_moments_keep_the_parameter_dtype(dtype):
    model, pairs = tiny_lora_model(seed=15, dtype=dtype, alpha=6.0)
    x, y = regression_batch(seed=16, dtype=dtype)
    opt = LoRAPro(pair_param_groups(pairs), lr=1e-3)
    for _ in range(2):
        _backward(model, x, y)
        opt.step()
    for pair in pairs:
        assert pair.A.dtype == pair.B.dtype == dtype
        assert opt.state[pair.B]["exp_avg"].dtype == dtype
        assert torch.isfinite(pair.A).all()
        assert torch.isfinite(pair.B).all()
        assert int(opt.state[pair.B]["skipped_steps"]) == 0


@pytest.mark.parametrize(("mode", "lr"), [("full_adam", 2e-2), ("sgd", 0.5)])
def test_loss_decreases(mode, lr):
    model, _, x, y, opt = _setup(seed=17, mode=mode, lr=lr)
    with torch.no_grad():
        start = float(mse(model, x, y))
    for _ in range(25):
        _backward(model, x, y)
        opt.step()
    with torch.no_grad():
        assert float(mse(model, x, y)) < 0.9 * start


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"mode": "foo"}, r"Invalid mode: 'foo' \(must be one of 'full_adam', 'sgd'\)"),
        ({"betas": (1.0, 0.999)}, r"Invalid betas: \(1.0, 0.999\) \(must be two numbers"),
        ({"betas": (0.9, -0.1)}, r"Invalid betas: \(0.9, -0.1\)"),
        ({"betas": (0.9,)}, r"Invalid betas: \(0.9,\)"),
        ({"eps": 0.0}, r"Invalid eps: 0.0 \(must be finite and > 0\)"),
        ({"damping": -1e-3}, r"Invalid damping: -0.001 \(must be finite and >= 0\)"),
        ({"lr": -1.0}, r"Invalid lr: -1.0 \(must be finite and >= 0\)"),
        ({"weight_decay": -0.1}, r"Invalid weight_decay: -0.1 \(must be finite and >= 0\)"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, pattern):
    _, pairs = tiny_lora_model(seed=18)
    with pytest.raises(ValueError, match=pattern):
        LoRAPro(pair_param_groups(pairs), **kwargs)


def test_invalid_group_hyperparameters_raise_in_add_param_group():
    _, pairs = tiny_lora_model(seed=19)
    first, second = pair_param_groups(pairs)
    opt = LoRAPro([first])
    with pytest.raises(ValueError, match=r"Invalid mode: 'adam'"):
        opt.add_param_group({**second, "mode": "adam"})
