"""LoRSum's stacked step (``foreach=True``): same-shape pairs stepped at once, as if one by one."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lorsum
from tests.optim.stacks import record_stack_sizes, three_plus_one, train

W = 40


def _model(seed=0):
    # With 8 rows per micro-batch the 40→40 gradients are kept as rows, with 3 micro-batches
    # they are folded into dense matrices (N(m + n) > mn): both forms are stacked.
    return three_plus_one(W, 6, seed=seed)


def _train(foreach, hparams, **options):
    return train("lorsum", foreach, hparams, width=W, **options)


def _factors(model):
    return [p.detach().clone() for pair in lorsum.find_lora_pairs(model) for p in (pair.A, pair.B)]


@pytest.mark.parametrize(
    "hparams",
    [
        {"lr": 0.2, "num_iters": 0},
        {"lr": 0.2, "num_iters": 2, "damping": 1e-2},
        {"lr": 0.2, "num_iters": 1, "momentum": 0.9, "weight_decay": 0.01},
        {"lr": 0.2, "num_iters": 1, "momentum": 0.9, "momentum_rank": 2, "max_grad_norm": 0.5},
    ],
)
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_a_stacked_step_equals_the_pair_by_pair_step(hparams, micro_batches):
    stacked, _ = _train(True, hparams, micro_batches=micro_batches)
    alone, _ = _train(False, hparams, micro_batches=micro_batches)
    for a, b in zip(_factors(stacked), _factors(alone), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_non_finite_pair_is_skipped_alone_in_its_stack():
    hparams = {"lr": 0.2, "num_iters": 1, "momentum": 0.9}
    clean, _ = _train(True, hparams, steps=3)
    before = _factors(clean)
    model, opt = _train(True, hparams, steps=4, poison=1)
    after = _factors(model)
    # Pair 1 (the second 40→40 layer) kept its factors from step 3; its stack-mates moved on.
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=0)
    torch.testing.assert_close(after[3], before[3], rtol=0, atol=0)
    assert not torch.equal(after[0], before[0])
    skipped = [int(opt.state[pair.B]["skipped_steps"]) for pair in opt.capture.pairs]
    assert skipped == [0, 1, 0, 0]


def test_groups_with_different_hyperparameters_are_not_stacked_together():
    def run(foreach):
        model = _model()
        pairs = lorsum.find_lora_pairs(model)
        groups = lorsum.pair_param_groups(pairs)
        groups[0]["lr"] = 0.05  # another rate inside what would otherwise be one stack
        groups[2]["num_iters"] = 3
        opt = lorsum.LoRSum(groups, lr=0.2, foreach=foreach, capture=lorsum.GradientCapture(pairs))
        x = torch.randn(8, W, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        model(x).square().mean().backward()
        opt.step()
        return _factors(model)

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_foreach_must_be_a_bool():
    model = _model()
    with pytest.raises(ValueError, match="Invalid foreach: 'yes'"):
        lorsum.create_optimizer(model, "lorsum", foreach="yes")


@pytest.fixture
def stack_sizes(monkeypatch):
    """The size of every stack LoRSum steps, in order."""
    return record_stack_sizes(monkeypatch, lorsum.LoRSum)


def test_same_shape_pairs_form_one_stack(stack_sizes):
    _train(True, {"lr": 0.2}, steps=1)
    assert sorted(stack_sizes) == [1, 3]
    stack_sizes.clear()
    _train(False, {"lr": 0.2}, steps=1)
    assert stack_sizes == [1, 1, 1, 1]


def test_pairs_with_large_captured_gradients_are_stepped_alone(stack_sizes, monkeypatch):
    from lorsum.optim import lorsum as lorsum_module

    monkeypatch.setattr(lorsum_module, "STACK_LIMIT", 8 * W)  # below one 40×40 pair's rows
    _train(True, {"lr": 0.2}, steps=1)
    assert stack_sizes == [1, 1, 1, 1]


class _CountComputeOperators(TorchDispatchMode):
    """Counts the operators that compute (on a GPU, kernels the host pays to launch): views
    and reads of 0-d CPU counters (the step counts that decide a stack's bias correction)
    launch nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func.overloadpacket is torch.ops.aten._local_scalar_dense):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _operators_per_step(optimizer_name: str, pairs: int, **hparams) -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(pairs)])
    lorsum.add_lora(model, lambda name, linear: True, rank=2)
    opt = lorsum.create_optimizer(model, optimizer_name, lr=0.1, **hparams)
    for _ in range(2):  # the second step is the steady one (state created at the first)
        model(torch.randn(4, 8)).square().mean().backward()
        with _CountComputeOperators() as counter:
            opt.step()
        opt.zero_grad()
    return counter.count


@pytest.mark.parametrize(
    ("optimizer_name", "hparams"),
    [
        ("lorsum", {}),
        ("lorsum", {"momentum": 0.9}),
        ("scaled_lorsum", {}),
        ("lora_pro", {}),
        ("precond_sgd", {}),
        ("precond_adamw", {}),
        ("svdlora", {}),
        ("svdlora", {"momentum": 0.9}),
    ],
)
def test_a_stack_computes_with_as_many_operators_for_many_pairs_as_for_few(optimizer_name, hparams):
    # The host's cost of a step on a GPU is its launches: a stack must not add any per member
    # (the step counters included), or 210 adapters pay 210 times for each.
    few = _operators_per_step(optimizer_name, 2, **hparams)
    many = _operators_per_step(optimizer_name, 12, **hparams)
    assert many == few
