"""Faults do not corrupt state: a step whose gradient (and so whose captured rows) is not finite
leaves every LoRA factor and every per-pair state tensor (momentum, Adam moments) as it was,
counts ``skipped_steps``, and training continues from there exactly as if that step had never
happened, with one warning per optimizer. ``nonfinite="skip_pair"`` (default) skips only the
pairs concerned, ``"skip_all"`` every pair and dense group. Also: ``torch.amp.GradScaler``'s inf
check composes with the optimizers."""

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
    with pytest.warns(RuntimeWarning, match="non-finite values"):
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


class _TwoBranches(torch.nn.Module):
    """Two independent adapted linears and a dense head on the second: a non-finite input to
    ``left`` makes only the left pair's gradient non-finite."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left = torch.nn.Linear(6, 5)
        self.right = torch.nn.Linear(6, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x_left, x_right):
        return self.left(x_left), self.head(torch.tanh(self.right(x_right)))


def _two_branch_setup(method, hparams, **options):
    model = _TwoBranches().double()
    pairs = lorsum.add_lora(model, ["left", "right"], rank=2)
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            pair.B.copy_(0.3 * torch.randn(pair.B.shape, generator=torch.Generator().manual_seed(i),
                                           dtype=torch.float64))  # fmt: skip
    opt = lorsum.create_optimizer(model, method, dense_lr=0.01, **hparams, **options)
    return model, pairs, opt


def _two_branch_step(model, opt, *, poison_left):
    g = torch.Generator().manual_seed(5)
    x_left, x_right = (torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(2))
    if poison_left:
        x_left[0, 0] = float("nan")
    y_left, y_right = (
        torch.randn(8, 5, generator=g, dtype=torch.float64),
        torch.randn(8, 3, generator=g, dtype=torch.float64),
    )
    opt.zero_grad()
    out_left, out_right = model(x_left, x_right)
    ((out_left - y_left).square().mean() + (out_right - y_right).square().mean()).backward()
    opt.step()


def _two_poisoned_steps(model, opt):
    _two_branch_step(model, opt, poison_left=True)
    _two_branch_step(model, opt, poison_left=True)


def _values(pairs, model):
    return [t.detach().clone() for pair in pairs for t in (pair.A, pair.B)] + [
        p.detach().clone() for p in model.head.parameters()
    ]


@pytest.mark.parametrize(("method", "hparams"), GUARDED, ids=GUARDED_IDS)
def test_skip_pair_skips_only_the_pair_with_a_non_finite_step_and_warns_once(method, hparams):
    model, pairs, opt = _two_branch_setup(method, hparams)
    _two_branch_step(model, opt, poison_left=False)
    before = _values(pairs, model)
    with pytest.warns(RuntimeWarning, match="non-finite values") as caught:
        _two_poisoned_steps(model, opt)
    assert sum("non-finite values" in str(w.message) for w in caught) == 1  # once per optimizer
    after = _values(pairs, model)
    assert torch.equal(after[0], before[0])  # left A and B: skipped
    assert torch.equal(after[1], before[1])
    assert not torch.equal(after[3], before[3])  # right: stepped
    assert [int(opt.state[p.B]["skipped_steps"]) for p in pairs] == [2, 0]


@pytest.mark.parametrize(("method", "hparams"), GUARDED, ids=GUARDED_IDS)
def test_skip_all_keeps_every_pair_and_dense_group_and_warns_once(method, hparams):
    model, pairs, opt = _two_branch_setup(method, hparams, nonfinite="skip_all")
    _two_branch_step(model, opt, poison_left=False)
    before = _values(pairs, model)
    with pytest.warns(RuntimeWarning, match="every pair was left untouched") as caught:
        _two_poisoned_steps(model, opt)
    assert sum("non-finite values" in str(w.message) for w in caught) == 1
    after = _values(pairs, model)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), method
    assert [int(opt.state[p.B]["skipped_steps"]) for p in pairs] == [2, 2]
    _two_branch_step(model, opt, poison_left=False)  # a finite step commits everything again
    assert all(not torch.equal(a, b) for a, b in zip(_values(pairs, model)[:4], before[:4],
                                                      strict=True))  # fmt: skip


def test_skip_all_matches_skip_pair_on_finite_steps():
    results = []
    for policy in ("skip_pair", "skip_all"):
        model, pairs, opt = _two_branch_setup("lorsum", {"lr": 0.3, "momentum": 0.5},
                                              nonfinite=policy)  # fmt: skip
        for _ in range(3):
            _two_branch_step(model, opt, poison_left=False)
        results.append(_values(pairs, model))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_nonfinite_policy_is_validated():
    model, _ = tiny_lora_model()
    with pytest.raises(ValueError, match="Invalid nonfinite: 'ignore'"):
        lorsum.create_optimizer(model, "lorsum", nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite='skip_all' with step_in_backward=True"):
        lorsum.create_optimizer(model, "lorsum", nonfinite="skip_all", step_in_backward=True)
