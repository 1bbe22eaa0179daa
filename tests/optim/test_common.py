"""The torch.optim contract, checked for every method of create_optimizer: descent, determinism,
bitwise save/load/continue with weights_only loading, LR schedulers, closures, pairs without
gradients, bf16 parameters, and the documented errors."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch
from torch import nn

import lorsum
from tests.utils import regression_batch, tiny_lora_model


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# (method, hyperparameters, steps for the descent check): learning rates that train the tiny
# regression in a few dozen steps, not tuned beyond that.
OPTIMIZER_DB = [
    ("lorsum", {"lr": 0.3, "num_iters": 1, "damping": 1e-3}),
    ("lorsum", {"lr": 0.3, "num_iters": 0, "damping": 1e-3, "momentum": 0.5}),
    ("lorsum", {"lr": 0.3, "num_iters": 2, "momentum": 0.9, "momentum_rank": 2,
                "weight_decay": 0.01}),
    ("svdlora", {"lr": 0.3}),
    ("svdlora", {"lr": 0.3, "svd": "randomized", "momentum": 0.5}),
    ("precond_sgd", {"lr": 0.3, "momentum": 0.9}),
    ("precond_adamw", {"lr": 0.01, "order": "sequential"}),
    ("loraplus", {"lr": 0.01, "loraplus_lr_ratio": 4.0}),
    ("adamw", {"lr": 0.01}),
    ("sgd", {"lr": 0.3, "momentum": 0.9}),
]  # fmt: skip
if _available("lorsum.optim.scaled_lorsum"):
    OPTIMIZER_DB += [
        ("scaled_lorsum", {"lr": 0.3}),
        ("scaled_lorsum", {"lr": 0.3, "metric": "shampoo", "metric_form": "dense"}),
    ]
if _available("lorsum.optim.lora_pro"):
    OPTIMIZER_DB += [("lora_pro", {"lr": 0.01}), ("lora_pro", {"lr": 0.3, "mode": "sgd"})]

IDS = [f"{method}-{i}" for i, (method, _) in enumerate(OPTIMIZER_DB)]


def _build(method, hparams, *, seed=0, dtype=torch.float64):
    model, _ = tiny_lora_model(seed=seed, dtype=dtype)
    return model, lorsum.create_optimizer(model, method, dense_lr=0.01, **hparams)


def _train(model, opt, steps, *, seed=1, scheduler=None):
    x, y = regression_batch(seed=seed, dtype=next(model.parameters()).dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_training_goes_downhill(method, hparams):
    model, opt = _build(method, hparams)
    losses = _train(model, opt, 30)
    assert losses[-1] < 0.85 * losses[0], f"{method}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"


@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_runs_are_deterministic(method, hparams):
    results = []
    for _ in range(2):
        model, opt = _build(method, hparams)
        _train(model, opt, 3)
        results.append(_params(model))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_save_load_continue_is_bitwise_equal_to_an_uninterrupted_run(method, hparams):
    model, opt = _build(method, hparams)
    _train(model, opt, 5)
    uninterrupted = _params(model)

    model, opt = _build(method, hparams)
    _train(model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what the Trainer does on resume
    resumed, resumed_opt = _build(method, hparams, seed=99)  # different init: all state must load
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    _train(resumed, resumed_opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(_params(resumed), uninterrupted, strict=True))


LORSUM_OPTIMIZERS = [(i, m, h) for i, (m, h) in zip(IDS, OPTIMIZER_DB, strict=True)
                     if m not in ("adamw", "sgd", "loraplus")]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "hparams"), [c[1:] for c in LORSUM_OPTIMIZERS], ids=[c[0] for c in LORSUM_OPTIMIZERS]
)
def test_a_checkpoint_older_than_a_hyperparameter_loads_with_its_default(method, hparams):
    # foreach came after the first checkpoints were written: torch's load_state_dict keeps the
    # saved groups as they are, so the missing keys must be filled in (with this optimizer's
    # values) or the next step fails on a KeyError.
    model, opt = _build(method, hparams)
    _train(model, opt, 5)
    uninterrupted = _params(model)
    model, opt = _build(method, hparams)
    _train(model, opt, 3)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        if group["kind"] == "lora":
            group.pop("foreach", None)
            group.pop("weight_decay")
    resumed, resumed_opt = _build(method, hparams, seed=99)
    resumed.load_state_dict(model.state_dict())
    resumed_opt.load_state_dict(saved)
    _train(resumed, resumed_opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(_params(resumed), uninterrupted, strict=True))


@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_lr_schedulers_drive_every_group(method, hparams):
    model, opt = _build(method, hparams)
    initial = [g["lr"] for g in opt.param_groups]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train(model, opt, 3, scheduler=scheduler)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr / 8 for lr in initial])


@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_a_closure_is_evaluated_and_its_loss_returned(method, hparams):
    model, opt = _build(method, hparams)
    x, y = regression_batch(seed=2)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    before = _params(model)
    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))


@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_a_pair_without_gradient_is_left_untouched(method, hparams):
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(5, 3), "unused": nn.Linear(5, 3)}).double()
    pairs = lorsum.add_lora(model, ["used", "unused"], rank=2)
    opt = lorsum.create_optimizer(model, method, **hparams)
    unused_before = [pairs[1].A.detach().clone(), pairs[1].B.detach().clone()]
    x = torch.randn(8, 5, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        model["used"](x).square().mean().backward()
        opt.step()
    assert torch.equal(pairs[1].A, unused_before[0])
    assert torch.equal(pairs[1].B, unused_before[1])


@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_bfloat16_parameters_stay_bfloat16_and_finite(method, hparams):
    model, opt = _build(method, hparams, dtype=torch.bfloat16)
    losses = _train(model, opt, 3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(loss == loss for loss in losses)  # no NaN


def test_capture_based_methods_expose_their_capture_and_it_comes_off():
    model, opt = _build("lorsum", {"lr": 0.1})
    assert isinstance(opt.capture, lorsum.GradientCapture)
    opt.capture.remove()
    x, y = regression_batch(seed=3)
    (model(x) - y).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match=r"has a gradient but no captured rows"):
        opt.step()  # nothing captured: the pairs are left untouched, loudly
    lora = {id(p) for m in model.modules() if isinstance(m, lorsum.LoRALinear)
            for p in (m.lora_A.weight, m.lora_B.weight)}  # fmt: skip
    for p, old in zip(model.parameters(), before, strict=True):
        if id(p) in lora:
            assert torch.equal(p, old)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: lorsum.create_optimizer(m, "adam"), ValueError, r"Unknown method: 'adam'"),
        (lambda m: lorsum.create_optimizer(m, "lorsum", damping=-1.0), ValueError,
         r"Invalid damping: -1.0"),
        (lambda m: lorsum.create_optimizer(m, "lorsum", num_iters=-1), ValueError,
         r"Invalid num_iters: -1"),
        (lambda m: lorsum.create_optimizer(m, "lorsum", momentum=1.0), ValueError,
         r"Invalid momentum: 1.0"),
        (lambda m: lorsum.create_optimizer(m, "lorsum", momentum_rank=0), ValueError,
         r"Invalid momentum_rank: 0"),
        (lambda m: lorsum.create_optimizer(m, "lorsum", lr=-0.1), ValueError, r"Invalid lr: -0.1"),
        (lambda m: lorsum.create_optimizer(m, "lorsum", compute_dtype="float16"), ValueError,
         r"invalid compute_dtype 'float16'"),
        (lambda m: lorsum.create_optimizer(m, "lorsum", max_grad_norm=0.0), ValueError,
         r"Invalid max_grad_norm: 0.0"),
        (lambda m: lorsum.create_optimizer(m, "svdlora", svd="full"), ValueError,
         r"Invalid svd: 'full' \(must be one of 'exact', 'gram', 'randomized'\)"),
        (lambda m: lorsum.create_optimizer(m, "precond_sgd", order="random"), ValueError,
         r"Invalid order: 'random'"),
        (lambda m: lorsum.create_optimizer(m, "lorsum", dense_optimizer="lion"), ValueError,
         r"Invalid dense_optimizer: 'lion'"),
        (lambda m: lorsum.create_optimizer(m, "loraplus", loraplus_lr_ratio=0.0), ValueError,
         r"Invalid loraplus_lr_ratio: 0.0"),
    ],
)  # fmt: skip
def test_invalid_hyperparameters_raise_with_the_offending_values(call, error, match):
    model, _ = tiny_lora_model(seed=4)
    with pytest.raises(error, match=match):
        call(model)


def test_invalid_param_groups_raise_with_the_offending_values():
    _, pairs = tiny_lora_model(seed=5)
    capture = lorsum.GradientCapture(pairs)
    groups = lorsum.pair_param_groups(pairs)
    cases = [
        ([{"params": [pairs[0].A], "kind": "lora"}], r"must hold exactly \[A, B\], got 1"),
        ([{"params": [pairs[0].B, pairs[0].A], "kind": "lora"}], r"expected \[A \(r, n\), B"),
        ([{**groups[0], "lora_scaling": 0.0}], r"invalid lora_scaling 0.0"),
        ([{**groups[0], "kind": "conv"}], r"Invalid param group kind: 'conv'"),
        ([{"params": [], "kind": "dense"}], r"a dense param group is empty"),
        ([], r"empty parameter list"),
    ]
    for groups_, match in cases:
        with pytest.raises(ValueError, match=match):
            lorsum.LoRSum(groups_, capture=capture)
    with pytest.raises(ValueError, match=r"pass capture=GradientCapture"):
        lorsum.LoRSum(groups)
    with pytest.raises(TypeError, match=r"take param groups, not bare tensors"):
        lorsum.LoRSum([pairs[0].A, pairs[0].B], capture=capture)
    with pytest.raises(ValueError, match=r"also belongs to"):
        lorsum.pair_param_groups([pairs[0], pairs[0]])
    other = lorsum.GradientCapture(pairs[:1])
    with pytest.raises(ValueError, match=r"LoRA pair '2' is not recorded by the capture"):
        lorsum.LoRSum(groups, capture=other)
    capture.remove()
    other.remove()


@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_a_diverging_learning_rate_never_raises_nor_writes_non_finite_factors(method, hparams):
    model, opt = _build(method, {**hparams, "lr": 1e12}, dtype=torch.float32)
    x, y = regression_batch(seed=6, dtype=torch.float32)
    for _ in range(4):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    if method not in ("adamw", "sgd", "loraplus"):  # torch's own optimizers make no such promise
        lora = [p for m in model.modules() if isinstance(m, lorsum.LoRALinear)
                for p in (m.lora_A.weight, m.lora_B.weight)]  # fmt: skip
        assert all(torch.isfinite(p).all() for p in lora)


@pytest.mark.parametrize("method", ["lorsum", "adamw", "lora_pro"])
def test_dense_parameters_can_be_left_to_another_optimizer(method):
    model, pairs = tiny_lora_model(seed=7)
    opt = lorsum.create_optimizer(model, method, dense=False)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for pair in pairs for p in (pair.A, pair.B)}
