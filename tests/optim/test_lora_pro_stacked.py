"""LoRA-Pro's stacked step (``foreach=True``): same-shape pairs stepped at once, as if alone.

Covers: the batched functional core (``(…, r, n)``, ``(…, m, r)``, ``(…, m, n)``) equals a Python
loop over its members (a property test, and two batch dims) and refuses mismatched batch dims;
the stacked optimizer step equals the pair-by-pair step (``foreach=False``) in float64 over
several steps, in both modes, with weight decay, clipping, a pair that misses a step (so its Adam
count lags and it is stacked apart) and a pair with one missing gradient; different
hyperparameters are never stacked together; stack sizes and the ``full_adam`` size bound; a
non-finite pair is skipped alone in its stack; the checkpoint format is unchanged (and one saved
without ``foreach`` loads); no host reads; and the ``foreach`` ValueError.
"""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lorsum
from lorsum.functional import (
    equivalent_gradient,
    lora_pro_adam,
    lora_pro_gradients,
    lora_pro_x,
)
from lorsum.functional.linalg import symmetric_eigh
from lorsum.functional.lora_pro import _damped_cholesky
from lorsum.optim import lora_pro as lora_pro_module
from tests import reference as ref
from tests.host_reads import no_host_reads, step_counters
from tests.optim.stacks import assert_pairs_close, pair_values, record_stack_sizes, three_plus_one
from tests.utils import randn, well_conditioned

F64 = torch.float64
W = 10

# --- the batched functional core -----------------------------------------------------------------


def _members(G, m, n, r, *, seed, zero_B=()):
    """``G`` well-conditioned pairs (``B = 0`` for the indices in ``zero_B``) and gradients."""
    As = [well_conditioned(r, n, seed=seed + 10 * i) for i in range(G)]
    Bs = [
        torch.zeros(m, r, dtype=F64)
        if i in zero_B
        else well_conditioned(m, r, seed=seed + 10 * i + 5)
        for i in range(G)
    ]
    grads_A = [randn(r, n, seed=seed + 10 * i + 1) for i in range(G)]
    grads_B = [randn(m, r, seed=seed + 10 * i + 2) for i in range(G)]
    return As, Bs, grads_A, grads_B


def _assert_members_match(batched, looped, bound=1e-10):
    """Each member of ``batched (G, …)`` equals the loop's result, to rounding."""
    assert batched.shape == (len(looped), *looped[0].shape)
    for i, expected in enumerate(looped):
        err = ref.rel_err(batched[i], expected)
        assert err <= bound, (
            f"member {i}: rel_err {err:.3e} > {bound:.0e}, shape {tuple(expected.shape)}, "
            f"dtype {expected.dtype}"
        )


@settings(max_examples=30, deadline=None)
@given(
    G=st.integers(1, 4),
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    r_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    scaling=st.sampled_from([0.5, 2.0]),
    damping=st.sampled_from([0.0, 1e-3]),
    step=st.integers(1, 5),
)
def test_property_batched_functions_equal_a_loop_over_the_members(
    G, m, n, r_frac, seed, scaling, damping, step
):
    r = 1 + int(r_frac * (min(m, n) - 1))
    # With damping, member 0 has PEFT's B = 0 (a singular Gram): it must not disturb the others.
    As, Bs, grads_A, grads_B = _members(G, m, n, r, seed=seed, zero_B={0} if damping else ())
    A, B, grad_A, grad_B = (torch.stack(t) for t in (As, Bs, grads_A, grads_B))
    Ms = [randn(m, n, seed=seed + 7 * i + 3) for i in range(G)]
    Vs = [randn(m, n, seed=seed + 7 * i + 4).square() for i in range(G)]
    options = {"scaling": scaling, "damping": damping}
    members = list(zip(As, Bs, grads_A, grads_B, strict=True))

    X = lora_pro_x(A, B, grad_A, grad_B, **options)
    _assert_members_match(X, [lora_pro_x(*pair, **options) for pair in members])

    shared, own = randn(r, r, seed=seed + 5), randn(G, r, r, seed=seed + 6)
    for choice in ("sylvester", shared, own):
        g_A, g_B = lora_pro_gradients(A, B, grad_A, grad_B, X=choice, **options)
        looped = [
            lora_pro_gradients(
                *pair, X=choice if isinstance(choice, str) or choice.ndim == 2 else choice[i],
                **options,
            )
            for i, pair in enumerate(members)
        ]  # fmt: skip
        _assert_members_match(g_A, [a for a, _ in looped])
        _assert_members_match(g_B, [b for _, b in looped])
        g_eq = equivalent_gradient(A, B, g_A, g_B, scaling=scaling)
        _assert_members_match(
            g_eq,
            [
                equivalent_gradient(a, b, ga, gb, scaling=scaling)
                for (a, b, *_), (ga, gb) in zip(members, looped, strict=True)
            ],
        )

    adam = {"step": step, "betas": (0.8, 0.95), "eps": 1e-8, **options}
    results = lora_pro_adam(A, B, grad_A, grad_B, torch.stack(Ms), torch.stack(Vs), **adam)
    looped = [
        lora_pro_adam(*pair, M, V, **adam) for pair, M, V in zip(members, Ms, Vs, strict=True)
    ]
    for k, batched in enumerate(results):
        _assert_members_match(batched, [out[k] for out in looped])


def test_two_batch_dims_equal_a_loop_over_the_members():
    m, n, r = 6, 5, 2
    As, Bs, grads_A, grads_B = _members(6, m, n, r, seed=30, zero_B={4})
    A, B, grad_A, grad_B = (
        torch.stack(t).view(2, 3, *t[0].shape) for t in (As, Bs, grads_A, grads_B)
    )
    zeros = torch.zeros(2, 3, m, n, dtype=F64)
    d_A, d_B, M, V = lora_pro_adam(
        A, B, grad_A, grad_B, zeros, zeros,
        step=1, scaling=2.0, betas=(0.9, 0.999), eps=1e-8, damping=1e-8,
    )  # fmt: skip
    assert d_A.shape == (2, 3, r, n)
    assert d_B.shape == (2, 3, m, r)
    assert M.shape == V.shape == (2, 3, m, n)
    for i in range(6):
        alone = lora_pro_adam(
            As[i], Bs[i], grads_A[i], grads_B[i], zeros[0, 0], zeros[0, 0],
            step=1, scaling=2.0, betas=(0.9, 0.999), eps=1e-8, damping=1e-8,
        )  # fmt: skip
        for batched, expected in zip((d_A, d_B, M, V), alone, strict=True):
            assert ref.rel_err(batched.flatten(0, 1)[i], expected) <= 1e-10


def test_each_member_of_a_stack_falls_back_from_a_failed_cholesky_on_its_own():
    # Member 0 is indefinite (Cholesky of K + δI fails: the clamped eigh factor replaces it);
    # member 1 is positive definite (its own Cholesky factor is kept).
    indefinite = torch.diag(torch.tensor([4.0, -1.0], dtype=F64))
    spd = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    grams, damping = torch.stack([indefinite, spd]), 0.5
    lam, U = symmetric_eigh(grams)
    L = _damped_cholesky(grams, damping, lam.clamp_min(0) + damping, U)
    for i, expected in enumerate(
        [torch.diag(torch.tensor([4.5, 0.5], dtype=F64)), spd + damping * torch.eye(2, dtype=F64)]
    ):
        torch.testing.assert_close(L[i] @ L[i].T, expected)
        assert torch.equal(L[i], L[i].tril())
    assert torch.equal(L[1], torch.linalg.cholesky(grams[1] + damping * torch.eye(2, dtype=F64)))


def test_batched_shape_errors_name_the_shapes():
    As, Bs, grads_A, grads_B = _members(3, 5, 4, 2, seed=40)
    A, B, grad_A, grad_B = (torch.stack(t) for t in (As, Bs, grads_A, grads_B))
    options = {"scaling": 1.0, "damping": 0.0}
    with pytest.raises(
        ValueError, match=r"same batch dims, got shapes \(3, 2, 4\) and \(2, 5, 2\)"
    ):
        lora_pro_gradients(A, B[:2], grad_A, grad_B[:2], **options)
    with pytest.raises(ValueError, match=r"gradients \(2, 2, 4\), \(3, 5, 2\) do not match"):
        lora_pro_gradients(A, B, grad_A[:2], grad_B, **options)
    with pytest.raises(ValueError, match=r"X must be \(2, 2\) or \(3, 2, 2\), got \(2, 2, 2\)"):
        lora_pro_gradients(A, B, grad_A, grad_B, X=torch.zeros(2, 2, 2, dtype=F64), **options)
    with pytest.raises(ValueError, match=r"expected A \(r, n\) and B \(m, r\), or stacks"):
        equivalent_gradient(A, B.mT, grad_A, grad_B.mT, scaling=1.0)
    zeros = torch.zeros(3, 5, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"moments must be \(3, 5, 4\), got \(5, 4\)"):
        lora_pro_adam(
            A, B, grad_A, grad_B, zeros[0], zeros,
            step=1, betas=(0.9, 0.999), eps=1e-8, **options,
        )  # fmt: skip


# --- the optimizer -----------------------------------------------------------------------------


def _model():
    return three_plus_one(W, 6, alpha=6.0)  # s = 2


def _backward(model, step, g, *, frozen_at=None):
    """One batch; pair 1's layer is bypassed (it gets no gradient) at step ``frozen_at``."""
    x = torch.randn(8, W, generator=g, dtype=F64)
    y = torch.randn(8, 6, generator=g, dtype=F64)
    h = torch.tanh(model[0](x))
    h = h if step == frozen_at else torch.tanh(model[2](h))
    out = model[6](torch.tanh(model[4](h)))
    (out - y).square().mean().backward()


def _train(foreach, hparams, *, steps=4, frozen_at=None, no_grad_A=None, poison=False):
    """``steps`` steps. Pair 1 gets no gradient at step ``frozen_at``; pair 2 no ``A.grad`` at
    step ``no_grad_A``; pair 1's ``B.grad`` is made NaN at the last step when ``poison``."""
    model = _model()
    opt = lorsum.create_optimizer(model, "lora_pro", foreach=foreach, **hparams)
    pairs = lorsum.find_lora_pairs(model)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        _backward(model, step, g, frozen_at=frozen_at)
        if step == no_grad_A:
            pairs[2].A.grad = None
        if poison and step == steps - 1:
            pairs[1].B.grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()
    return model, opt


def _assert_close(stacked, alone):
    assert_pairs_close(stacked, alone, rtol=1e-10, atol=1e-12)


@pytest.fixture
def stack_sizes(monkeypatch):
    """The size of every stack LoRAPro steps, in order."""
    return record_stack_sizes(monkeypatch, lorsum.LoRAPro)


HPARAMS = [
    {"lr": 2e-2},
    {"lr": 2e-2, "betas": (0.8, 0.95), "weight_decay": 0.1},
    {"lr": 2e-2, "max_grad_norm": 0.05},
    {"lr": 0.3, "mode": "sgd"},
    {"lr": 0.3, "mode": "sgd", "weight_decay": 0.1, "damping": 1e-3},
    {"lr": 0.3, "mode": "sgd", "max_grad_norm": 0.05},
]


@pytest.mark.parametrize("hparams", HPARAMS)
def test_a_stacked_step_equals_the_pair_by_pair_step(hparams):
    stacked = pair_values(*_train(True, hparams))
    alone = pair_values(*_train(False, hparams))
    _assert_close(stacked, alone)


@pytest.mark.parametrize("hparams", [HPARAMS[1], HPARAMS[4]])
def test_pairs_that_missed_a_step_or_a_gradient_still_match_the_pair_by_pair_step(hparams):
    # Pair 1 gets no gradient at step 1 (its Adam count then lags its stack-mates'), pair 2 no
    # A.grad at step 2 (it counts as zero): both are stacked apart on those steps.
    runs = {}
    for foreach in (True, False):
        model, opt = _train(foreach, hparams, steps=5, frozen_at=1, no_grad_A=2)
        runs[foreach] = pair_values(model, opt)
        counts = [float(opt.state[p.B]["step"]) for p in lorsum.find_lora_pairs(model)]
        assert counts == [5, 4, 5, 5]
    _assert_close(runs[True], runs[False])


@pytest.mark.parametrize("change", [{"lora_scaling": 0.5}, {"lr": 5e-3}, {"betas": (0.5, 0.9)}])
def test_pairs_with_other_hyperparameters_are_not_stacked_together(stack_sizes, change):
    def run(foreach):
        model = _model()
        pairs = lorsum.find_lora_pairs(model)
        groups = lorsum.pair_param_groups(pairs)
        groups[0].update(change)  # pair 0 leaves the stack of the three 10→10 pairs
        opt = lorsum.LoRAPro(groups, lr=2e-2, foreach=foreach)
        g = torch.Generator().manual_seed(3)
        for step in range(2):
            _backward(model, step, g)
            opt.step()
            opt.zero_grad()
        return pair_values(model, opt)

    stacked = run(True)
    assert sorted(stack_sizes) == [1, 1, 1, 1, 2, 2]  # per step: pair 0, pairs 1 and 2, pair 3
    _assert_close(stacked, run(False))


@pytest.mark.parametrize("mode", ["full_adam", "sgd"])
def test_a_non_finite_pair_is_skipped_alone_in_its_stack(mode):
    hparams = {"lr": 2e-2 if mode == "full_adam" else 0.3, "mode": mode}
    before = pair_values(*_train(True, hparams, steps=3))
    clean = pair_values(*_train(True, hparams, steps=4))
    model, opt = _train(True, hparams, steps=4, poison=True)
    after = pair_values(model, opt)
    # Pair 1 (the second 10→10 layer) kept its factors and moments from step 3 ...
    for old, new in zip(before[1], after[1], strict=True):
        assert torch.equal(old, new)
    # ... while its stack-mates (and the 10→6 pair) took the step a clean run takes.
    _assert_close([after[i] for i in (0, 2, 3)], [clean[i] for i in (0, 2, 3)])
    pairs = lorsum.find_lora_pairs(model)
    assert [int(opt.state[p.B]["skipped_steps"]) for p in pairs] == [0, 1, 0, 0]
    assert [float(opt.state[p.B]["step"]) for p in pairs] == [4, 4, 4, 4]


@pytest.mark.parametrize("mode", ["full_adam", "sgd"])
def test_same_shape_pairs_form_one_stack(stack_sizes, mode):
    _train(True, {"mode": mode}, steps=1)
    assert sorted(stack_sizes) == [1, 3]
    stack_sizes.clear()
    _train(False, {"mode": mode}, steps=1)
    assert stack_sizes == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("full_adam", [[1, 3], [1, 2], [1, 1, 2]]), ("sgd", [[1, 3], [1, 2], [1, 3]])],
)
def test_a_pair_whose_adam_count_lags_is_stacked_apart(stack_sizes, mode, expected):
    _train(True, {"lr": 2e-2, "mode": mode}, steps=3, frozen_at=1)
    # Step 0: the three 10→10 pairs and the 10→6 one. Step 1: pair 1 gets no gradient. Step 2:
    # pair 1 is at t = 2, pairs 0 and 2 at t = 3; only the bias correction of "full_adam"
    # depends on t, so "sgd" stacks them together again.
    sizes = iter(stack_sizes)
    per_step = [sorted(next(sizes) for _ in step) for step in expected]
    assert per_step == expected
    assert next(sizes, None) is None


def test_full_adam_stacks_are_bounded_in_size(stack_sizes, monkeypatch):
    monkeypatch.setattr(lora_pro_module, "STACK_LIMIT", 2 * W * W)  # two 10×10 moments
    _train(True, {"lr": 2e-2}, steps=1)
    assert sorted(stack_sizes) == [1, 1, 2]
    stack_sizes.clear()
    monkeypatch.setattr(lora_pro_module, "STACK_LIMIT", W * W - 1)  # below one pair
    _train(True, {"lr": 2e-2}, steps=1)
    assert stack_sizes == [1, 1, 1, 1]
    stack_sizes.clear()
    # "sgd" keeps no m×n work: its stacks are not bounded.
    _train(True, {"lr": 0.3, "mode": "sgd"}, steps=1)
    assert sorted(stack_sizes) == [1, 3]


def test_bounded_stacks_still_equal_the_pair_by_pair_step(monkeypatch):
    monkeypatch.setattr(lora_pro_module, "STACK_LIMIT", 2 * W * W)
    _assert_close(pair_values(*_train(True, HPARAMS[1])), pair_values(*_train(False, HPARAMS[1])))


# --- state and checkpoints ---------------------------------------------------------------------


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mode", ["full_adam", "sgd"])
def test_state_dict_format_and_round_trip_are_unchanged(mode):
    hparams = {"lr": 2e-2 if mode == "full_adam" else 0.3, "mode": mode, "weight_decay": 0.1}
    states = {}
    for foreach in (True, False):
        _, opt = _train(foreach, hparams, steps=2)
        states[foreach] = opt.state_dict()
    # The same entries, shapes and dtypes pair by pair: stacking is not visible in the state.
    for stacked, alone in zip(
        states[True]["state"].values(), states[False]["state"].values(), strict=True
    ):
        assert sorted(stacked) == sorted(alone)
        for key in stacked:
            assert stacked[key].shape == alone[key].shape
            assert stacked[key].dtype == alone[key].dtype
            assert stacked[key].device == alone[key].device
    keys = {"step", "skipped_steps"} | ({"exp_avg", "exp_avg_sq"} if mode == "full_adam" else set())
    assert all(set(state) == keys for state in states[True]["state"].values())
    assert len(states[True]["state"]) == 4  # keyed by B only
    assert all(group["foreach"] is True for group in states[True]["param_groups"])

    # Resume: two steps, save, load into a fresh optimizer, two more steps == four steps.
    reference, _ = _train(True, hparams, steps=4)
    model = _model()
    opt = lorsum.create_optimizer(model, "lora_pro", **hparams)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        if step == 2:
            saved = _round_trip({"model": model.state_dict(), "optimizer": opt.state_dict()})
            model = _model()
            model.load_state_dict(saved["model"])
            opt = lorsum.create_optimizer(model, "lora_pro", **hparams)
            opt.load_state_dict(saved["optimizer"])
        _backward(model, step, g)
        opt.step()
        opt.zero_grad()
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_without_foreach_loads_with_the_default():
    _, opt = _train(True, {"lr": 2e-2}, steps=1)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group.pop("foreach")  # as saved before the option existed
    model = _model()
    resumed = lorsum.create_optimizer(model, "lora_pro", lr=2e-2, foreach=False)
    resumed.load_state_dict(_round_trip(saved))
    # The missing hyperparameter takes this optimizer's value, as add_param_group would give it.
    assert all(group["foreach"] is False for group in resumed.param_groups)
    _backward(model, 1, torch.Generator().manual_seed(1))
    resumed.step()
    assert all(float(resumed.state[p.B]["step"]) == 2 for p in lorsum.find_lora_pairs(model))


# --- host reads and errors ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full_adam", "sgd"])
def test_a_stacked_step_reads_nothing_back(mode):
    model = _model()
    opt = lorsum.create_optimizer(model, "lora_pro", lr=1e-2, mode=mode, max_grad_norm=1.0)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        _backward(model, step, g)
        # The first step is a warm-up: it creates the state.
        with no_host_reads(step_counters(opt)) if step else contextlib.nullcontext():
            opt.step()
        opt.zero_grad()


def test_foreach_must_be_a_bool():
    with pytest.raises(ValueError, match=r"Invalid foreach: 'yes' \(must be True or False\)"):
        lorsum.create_optimizer(_model(), "lora_pro", foreach="yes")
