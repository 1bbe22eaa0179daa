"""SVDLoRA's stacked step (``foreach=True``): same-shape pairs' steps decomposed by one batched
SVD, as if one by one; a stack bounded in size; a failed or non-finite member skipped alone."""

from __future__ import annotations

import copy

import pytest
import torch

import lorsum
from lorsum.optim import svd_lora as svd_lora_module
from tests.optim.stacks import (
    assert_pairs_close,
    pair_values,
    poison_captured,
    record_stack_sizes,
    three_plus_one,
    train,
)

W = 40


def _train(foreach, hparams, **options):
    return train("svdlora", foreach, hparams, width=W, **options)


def _assert_close(ours, theirs):
    assert_pairs_close(ours, theirs, rtol=1e-9, atol=1e-11)


@pytest.fixture
def stack_sizes(monkeypatch):
    """The size of every stack SVDLoRA steps, in order."""
    return record_stack_sizes(monkeypatch, lorsum.SVDLoRA)


HPARAMS = [
    {"lr": 0.2},
    {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.1},
    {"lr": 0.2, "momentum": 0.5, "max_grad_norm": 0.05},
    {"lr": 0.2, "svd": "randomized", "oversamples": 2, "power_iters": 1},
    {"lr": 0.2, "svd": "randomized", "momentum": 0.9},
    {"lr": 0.2, "svd": "gram"},
    {"lr": 0.2, "svd": "gram", "momentum": 0.9, "weight_decay": 0.1},
]


@pytest.mark.parametrize("hparams", HPARAMS)
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_a_stacked_step_equals_the_pair_by_pair_step(hparams, micro_batches):
    # With 3 micro-batches the captured gradients are folded to dense matrices: both layouts.
    stacked = pair_values(*_train(True, hparams, micro_batches=micro_batches))
    alone = pair_values(*_train(False, hparams, micro_batches=micro_batches))
    _assert_close(stacked, alone)


@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_the_stacked_step_is_the_projected_full_step(svd):
    # The oracle, in float64: each pair's s·B'A' is the best rank-r part of s·BA − η·G.
    model = three_plus_one(W, 6)
    pairs = lorsum.find_lora_pairs(model)
    before = [(pair.scaling * pair.B @ pair.A).detach().clone() for pair in pairs]
    opt = lorsum.create_optimizer(model, "svdlora", lr=0.2, svd=svd)
    x = torch.randn(8, W, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model(x).square().mean().backward()
    gradients = [opt.capture.peek(pair.B).to_dense() / pair.scaling for pair in pairs]
    opt.step()
    for pair, W_ba, G in zip(pairs, before, gradients, strict=True):
        expected = lorsum.functional.best_rank_r(W_ba - 0.2 * G, pair.A.shape[0])
        torch.testing.assert_close(pair.scaling * pair.B @ pair.A, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_a_cuda_step_projects_the_full_step_and_skips_a_non_finite_pair_alone(svd):
    # On CUDA a solver may return NaN for a non-finite input where the CPU's raises: either way
    # only that member keeps its factors, and the others take the float64 oracle's step.
    model = three_plus_one(W, 6).cuda()
    pairs = lorsum.find_lora_pairs(model)
    before = [(pair.scaling * pair.B @ pair.A).detach().cpu() for pair in pairs]
    factors = [(pair.B.detach().clone(), pair.A.detach().clone()) for pair in pairs]
    opt = lorsum.create_optimizer(model, "svdlora", lr=0.2, svd=svd)
    x = torch.randn(8, W, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model(x.cuda()).square().mean().backward()
    gradients = [opt.capture.peek(pair.B).to_dense().cpu() / pair.scaling for pair in pairs]
    poison_captured(opt, 1)
    opt.step()
    for i, (pair, W_ba, G) in enumerate(zip(pairs, before, gradients, strict=True)):
        if i == 1:
            assert torch.equal(pair.B, factors[i][0])
            assert torch.equal(pair.A, factors[i][1])
            continue
        expected = lorsum.functional.best_rank_r(W_ba - 0.2 * G, pair.A.shape[0])
        torch.testing.assert_close(
            (pair.scaling * pair.B @ pair.A).cpu(), expected, rtol=1e-9, atol=1e-12
        )
    skipped = [int(opt.state[pair.B].get("skipped_steps", 0)) for pair in pairs]
    assert skipped == [0, 1, 0, 0]


def test_the_gram_route_trains_as_the_exact_svd_does():
    # Both are the exact truncated SVD: over several steps with momentum the adapters' products
    # and the momentum agree to float64 rounding, amplified only by the Gram matrix's squared
    # conditioning. (Each direction's sign is the solver's own, so the factors may differ by
    # the signs of their columns and rows; the next step reads only the product.)
    hparams = {"lr": 0.2, "momentum": 0.9}
    runs = [_train(True, {**hparams, "svd": svd}, steps=4) for svd in ("gram", "exact")]
    (gram_model, gram_opt), (exact_model, exact_opt) = runs
    pairs = zip(
        lorsum.find_lora_pairs(gram_model), lorsum.find_lora_pairs(exact_model), strict=True
    )
    for ours, theirs in pairs:
        torch.testing.assert_close(ours.B @ ours.A, theirs.B @ theirs.A, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(
            gram_opt.state[ours.B]["momentum_buffer_dense"],
            exact_opt.state[theirs.B]["momentum_buffer_dense"],
            rtol=1e-7,
            atol=1e-10,
        )


def test_same_shape_pairs_form_one_stack(stack_sizes):
    _train(True, {"lr": 0.2}, steps=1)
    assert sorted(stack_sizes) == [1, 3]
    stack_sizes.clear()
    _train(False, {"lr": 0.2}, steps=1)
    assert stack_sizes == [1, 1, 1, 1]
    stack_sizes.clear()
    _train(True, {"lr": 0.2, "svd": "randomized"}, steps=1)
    assert sorted(stack_sizes) == [1, 3]


def test_stacks_are_cut_where_their_dense_steps_pass_the_limit(stack_sizes, monkeypatch):
    monkeypatch.setattr(svd_lora_module, "STACK_LIMIT", 2 * W * W)  # two 40×40 steps
    hparams = {"lr": 0.2, "momentum": 0.9}
    cut = pair_values(*_train(True, hparams, steps=2))
    assert stack_sizes == [2, 1, 1] * 2
    _assert_close(cut, pair_values(*_train(False, hparams, steps=2)))


@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_a_non_finite_pair_is_skipped_alone_in_its_stack(svd):
    hparams = {"lr": 0.2, "momentum": 0.9, "svd": svd}
    before = pair_values(*_train(True, hparams, steps=3))
    clean = pair_values(*_train(True, hparams, steps=4))
    model, opt = _train(True, hparams, steps=4, poison=1)
    after = pair_values(model, opt)
    # Pair 1 (the second 40→40 layer) kept its factors and momentum from step 3 ...
    for old, new in zip(before[1], after[1], strict=True):
        assert torch.equal(old, new)
    # ... while its stack-mates (and the 40→6 pair) took the step a clean run takes.
    _assert_close([after[i] for i in (0, 2, 3)], [clean[i] for i in (0, 2, 3)])
    skipped = [int(opt.state[pair.B]["skipped_steps"]) for pair in opt.capture.pairs]
    assert skipped == [0, 1, 0, 0]


@pytest.mark.parametrize(
    ("svd", "function"),
    [
        ("exact", "truncated_svd"),
        ("gram", "gram_truncated_svd"),
        ("randomized", "randomized_svd"),
    ],
)
def test_a_member_whose_svd_fails_is_skipped_alone(monkeypatch, svd, function):
    # The batched call fails when any member fails; the members are then decomposed one by
    # one, and only the failing one (here: the stack's second) keeps its factors.
    hparams = {"lr": 0.2, "svd": svd}
    before = pair_values(*_train(True, hparams, steps=1))
    clean = pair_values(*_train(True, hparams, steps=2))
    real = getattr(svd_lora_module, function)
    stack_sizes = []

    def flaky(target, *args, **kwargs):
        stack_sizes.append(target.shape[0] if isinstance(target, torch.Tensor) else target.batch[0])
        if stack_sizes[-1] > 1 or len(stack_sizes) == 3:  # the stack of 3, then member 1 alone
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(target, *args, **kwargs)

    def arm():
        monkeypatch.setattr(svd_lora_module, function, flaky)

    model, opt = _train(True, hparams, steps=2, before_last=arm)
    assert sorted(stack_sizes) == [1, 1, 1, 1, 3]  # the 40→6 pair's stack of one too
    after = pair_values(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    _assert_close([after[i] for i in (0, 2, 3)], [clean[i] for i in (0, 2, 3)])
    skipped = [int(opt.state[pair.B].get("skipped_steps", 0)) for pair in opt.capture.pairs]
    assert skipped == [0, 1, 0, 0]


def test_a_checkpoint_without_foreach_loads_with_the_default():
    _, opt = _train(True, {"lr": 0.2, "momentum": 0.9}, steps=1)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group.pop("foreach")  # as saved before the option existed
    model = three_plus_one(W, 6)
    resumed = lorsum.create_optimizer(model, "svdlora", lr=0.2, momentum=0.9)
    resumed.load_state_dict(saved)
    assert all(group["foreach"] is True for group in resumed.param_groups)
    model(torch.randn(8, W, dtype=torch.float64)).square().mean().backward()
    resumed.step()
    assert all(float(resumed.state[p.B]["step"]) == 2 for p in lorsum.find_lora_pairs(model))


def test_foreach_must_be_a_bool():
    with pytest.raises(ValueError, match=r"Invalid foreach: 'yes' \(must be True or False\)"):
        lorsum.create_optimizer(three_plus_one(W, 6), "svdlora", foreach="yes")
