"""ScaledLoRSum's stacked step (``foreach=True``) against its pair-by-pair step, in float64.

Covers K-FAC and Shampoo, diagonal and dense metrics, with and without momentum, weight decay,
clipping, a summed loss, no bias correction, gradient accumulation (rows kept, and folded into
dense ``G``), a layer called twice (rows of another length), a layer that misses a step (its
step count then differs from its stack-mates'); a non-finite pair skipped alone in its stack
(factors, metric averages and momentum kept, its stack-mates as in a clean run); the stacks
formed; the size limit; ``foreach`` validation; the ``state_dict`` round trip (per-pair
state, bitwise continuation, checkpoints without ``foreach``); and no value read back from the
device by a stacked step (the CPU guard, and CUDA's sync-debug mode where a GPU is present).
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn

import lorsum
from lorsum.optim import scaled_lorsum as scaled_module
from lorsum.optim.scaled_lorsum import ScaledLoRSum
from tests.host_reads import cuda_sync_is_an_error, no_host_reads, step_counters
from tests.optim.stacks import poison_captured, record_stack_sizes

W = 40  # three W→W layers (one stack) and a W→6 head (a stack of its own)
TOLERANCES = {"rtol": 1e-10, "atol": 1e-12}
METRICS = [("kfac", "diagonal"), ("kfac", "dense"), ("shampoo", "diagonal"), ("shampoo", "dense")]
BASE = {"lr": 0.05, "num_iters": 1, "damping": 1e-2, "metric_damping": 1e-3}


class _Net(nn.Module):
    """``l0 → l1 → l2 → head`` with tanh; ``l1`` can be skipped and ``l2`` called twice.

    With 8 rows per micro-batch the W→W gradients are kept as rows (``N (m + n) <= m n``), with
    3 micro-batches (or ``l2`` called twice over 2) they are folded into dense ``G``; the head's
    (``m n = 240``) is always folded.
    """

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(W, W), nn.Linear(W, W), nn.Linear(W, W)
        self.head = nn.Linear(W, 6)
        self.shared = shared
        self.skip_l1 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l0(x))
        if not self.skip_l1:
            h = torch.tanh(self.l1(h))
        h = torch.tanh(self.l2(h))
        if self.shared:
            h = torch.tanh(self.l2(h))
        return self.head(h)


def _model(shared: bool = False) -> _Net:
    torch.manual_seed(0)
    model = _Net(shared).double()
    lorsum.add_lora(model, ["l0", "l1", "l2", "head"], rank=3, alpha=6.0)  # s = 2
    with torch.no_grad():
        for pair in lorsum.find_lora_pairs(model):
            pair.B.normal_(std=0.3)
    return model


def _train(foreach, hparams, *, steps=4, micro_batches=1, poison=None, skip_l1_at=(), shared=False):
    """``steps`` steps; ``poison``: make pair ``poison``'s last captured gradient non-finite."""
    model = _model(shared)
    opt = lorsum.create_optimizer(model, "scaled_lorsum", foreach=foreach, **hparams)
    g = torch.Generator().manual_seed(1)
    sum_loss = hparams.get("loss_reduction") == "sum"
    for step in range(steps):
        model.skip_l1 = step in skip_l1_at
        for _ in range(micro_batches):
            x = torch.randn(8, W, generator=g, dtype=torch.float64)
            y = torch.randn(8, 6, generator=g, dtype=torch.float64)
            residual = (model(x) - y).square()
            (residual.sum() if sum_loss else residual.mean() / micro_batches).backward()
        if poison is not None and step == steps - 1:
            poison_captured(opt, poison)
        opt.step()
        opt.zero_grad()
    return model, opt


def _pair_values(opt):
    """Per pair: its factors and every state tensor of A and B, by name."""
    values = []
    for pair in opt.capture.pairs:
        found = {"A": pair.A.detach().clone(), "B": pair.B.detach().clone()}
        for factor, p in (("A", pair.A), ("B", pair.B)):
            for key, value in opt.state[p].items():
                found[f"{factor}.{key}"] = value.clone()
        values.append(found)
    return values


def _assert_same_pairs(got, expected):
    for index, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        assert mine.keys() == theirs.keys(), (index, sorted(mine), sorted(theirs))
        for name, value in mine.items():
            if value.is_floating_point():
                where = f"pair {index}, {name}"
                torch.testing.assert_close(
                    value, theirs[name], **TOLERANCES, msg=lambda m, w=where: f"{w}: {m}"
                )
            else:
                assert torch.equal(value, theirs[name]), (index, name, value, theirs[name])


@pytest.fixture
def stack_sizes(monkeypatch):
    """The size of every stack ScaledLoRSum steps, in order."""
    return record_stack_sizes(monkeypatch, ScaledLoRSum)


# --- stacked equals pair by pair ---------------------------------------------------------------

VARIANTS = {
    "no-momentum": {"betas": (0.0, 0.9)},
    "momentum-wd": {"betas": (0.9, 0.9), "weight_decay": 0.01},
    "jacobi-clip": {"betas": (0.9, 0.95), "num_iters": 0, "max_grad_norm": 0.05},
    "sum-uncorrected": {
        "betas": (0.8, 0.9), "num_iters": 2, "momentum_rank": 2, "bias_correction": False,
        "loss_reduction": "sum",
    },
}  # fmt: skip


@pytest.mark.parametrize("micro_batches", [1, 3], ids=["rows", "folded"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("metric", "form"), METRICS)
def test_a_stacked_step_equals_the_pair_by_pair_step(metric, form, variant, micro_batches):
    hparams = {**BASE, "metric": metric, "metric_form": form, **VARIANTS[variant]}
    _, stacked = _train(True, hparams, steps=3, micro_batches=micro_batches)
    _, alone = _train(False, hparams, steps=3, micro_batches=micro_batches)
    _assert_same_pairs(_pair_values(stacked), _pair_values(alone))
    assert all(int(stacked.state[p.B]["step"]) == 3 for p in stacked.capture.pairs)


@pytest.mark.parametrize(("metric", "form"), METRICS)
def test_a_pair_that_misses_a_step_is_stacked_by_its_own_step_count(metric, form, stack_sizes):
    hparams = {**BASE, "metric": metric, "metric_form": form, "betas": (0.9, 0.9)}
    _, stacked = _train(True, hparams, skip_l1_at=(1,))
    # Step 1: l1 sees no backward (left out); from step 2 its t is one behind l0's and l2's.
    assert stack_sizes == [3, 1, 2, 1, 2, 1, 1, 2, 1, 1]
    _, alone = _train(False, hparams, skip_l1_at=(1,))
    _assert_same_pairs(_pair_values(stacked), _pair_values(alone))
    steps = [int(stacked.state[p.B]["step"]) for p in stacked.capture.pairs]
    assert steps == [4, 3, 4, 4]


@pytest.mark.parametrize("metric", ["kfac", "shampoo"])
def test_rows_of_another_length_form_their_own_stack(metric, stack_sizes):
    hparams = {**BASE, "metric": metric, "betas": (0.9, 0.9)}
    _, stacked = _train(True, hparams, steps=2, shared=True)
    # l2 is called twice (16 rows, still kept as rows), l0 and l1 once (8 rows).
    assert stack_sizes == [2, 1, 1] * 2
    _, alone = _train(False, hparams, steps=2, shared=True)
    _assert_same_pairs(_pair_values(stacked), _pair_values(alone))


# --- non-finite members ------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "form"), METRICS)
def test_a_non_finite_pair_is_skipped_alone_in_its_stack(metric, form):
    hparams = {**BASE, "metric": metric, "metric_form": form, "betas": (0.9, 0.9)}
    _, before = _train(True, hparams, steps=3)
    _, clean = _train(True, hparams, steps=4)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _, poisoned = _train(True, hparams, steps=4, poison=1)
    kept, after = _pair_values(before)[1], _pair_values(poisoned)[1]
    # Pair 1 (l1) kept its factors, metric averages and momentum from step 3 ...
    for name in ("A", "B", "A.metric_in_avg", "B.metric_out_avg"):
        assert torch.equal(after[name], kept[name]), name
    for name in ("A.momentum_buffer", "B.momentum_buffer"):
        assert torch.equal(after[name], kept[name]), name
    assert int(after["B.step"]) == 4  # the skipped step still counts (bias correction)
    skipped = [int(poisoned.state[p.B]["skipped_steps"]) for p in poisoned.capture.pairs]
    assert skipped == [0, 1, 0, 0]
    # ... and its stack-mates (and the head) are exactly as in a run without the overflow: a
    # non-finite metric of pair 1 is replaced by the identity for pair 1 alone.
    values, reference = _pair_values(poisoned), _pair_values(clean)
    _assert_same_pairs([values[i] for i in (0, 2, 3)], [reference[i] for i in (0, 2, 3)])


# --- stacks --------------------------------------------------------------------------------------


def test_same_shape_pairs_form_one_stack(stack_sizes):
    _train(True, {**BASE, "metric": "shampoo"}, steps=1)
    assert stack_sizes == [3, 1]
    stack_sizes.clear()
    _train(False, {**BASE, "metric": "shampoo"}, steps=1)
    assert stack_sizes == [1, 1, 1, 1]


def test_groups_with_other_hyperparameters_are_not_stacked_together(stack_sizes):
    def run(foreach):
        model = _model()
        pairs = lorsum.find_lora_pairs(model)
        groups = lorsum.pair_param_groups(pairs)
        groups[0]["lr"] = 0.02  # another rate inside what would otherwise be one stack
        capture = lorsum.GradientCapture(pairs, statistics="diagonal")
        opt = ScaledLoRSum(groups, foreach=foreach, capture=capture, **BASE)
        x = torch.randn(8, W, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        model(x).square().mean().backward()
        opt.step()
        return opt

    stacked = run(True)
    assert stack_sizes == [1, 2, 1]
    _assert_same_pairs(_pair_values(stacked), _pair_values(run(False)))


def test_pairs_with_large_captured_gradients_are_stepped_alone(stack_sizes, monkeypatch):
    monkeypatch.setattr(scaled_module, "STACK_LIMIT", 8 * W)  # below one W×W pair's rows
    _train(True, BASE, steps=1)
    assert stack_sizes == [1, 1, 1, 1]


def test_foreach_must_be_a_bool():
    with pytest.raises(ValueError, match="Invalid foreach: 'yes'"):
        lorsum.create_optimizer(_model(), "scaled_lorsum", foreach="yes")


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "form"), [("kfac", "diagonal"), ("shampoo", "dense")])
def test_save_load_continue_is_bitwise_equal_to_an_uninterrupted_run(metric, form):
    hparams = {**BASE, "metric": metric, "metric_form": form, "betas": (0.9, 0.9)}
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(8, W, generator=g).double(), torch.randn(8, 6, generator=g).double())
        for _ in range(4)
    ]

    def steps(model, opt, chunk):
        for x, y in chunk:
            (model(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad()

    model = _model()
    opt = lorsum.create_optimizer(model, "scaled_lorsum", **hparams)
    steps(model, opt, batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = _model()
    opt = lorsum.create_optimizer(model, "scaled_lorsum", **hparams)
    steps(model, opt, batches[:2])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    # The state stays per pair, in the shapes of the pair-by-pair step.
    for pair in opt.capture.pairs:
        m, n = pair.B.shape[0], pair.A.shape[1]
        state_A, state_B = opt.state[pair.A], opt.state[pair.B]
        assert set(state_B) == {"step", "skipped_steps", "metric_out_avg", "momentum_buffer"}
        assert set(state_A) == {"metric_in_avg", "momentum_buffer"}
        expected = ((m,), (n,)) if form == "diagonal" else ((m, m), (n, n))
        assert (state_B["metric_out_avg"].shape, state_A["metric_in_avg"].shape) == expected
    for group in saved["optimizer"]["param_groups"]:
        if group["kind"] == "lora":
            del group["foreach"]  # a checkpoint from before foreach existed: the default
    resumed = _model()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # another start: everything must come from the checkpoint
    resumed_opt = lorsum.create_optimizer(resumed, "scaled_lorsum", **hparams)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    lora_groups = [g for g in resumed_opt.param_groups if g["kind"] == "lora"]
    assert [group["foreach"] for group in lora_groups] == [True] * 4
    steps(resumed, resumed_opt, batches[2:])
    for a, b in zip(resumed.parameters(), uninterrupted, strict=True):
        assert torch.equal(a, b)


# --- no host synchronisation -------------------------------------------------------------------


def _steps_reading_nothing_back(metric, device, guard):
    """Three stacked steps (stacks of 3 and 1); the last two inside ``guard(optimizer)``."""
    model = _model().to(device)
    hparams = {**BASE, "metric": metric, "betas": (0.9, 0.99)}
    opt = lorsum.create_optimizer(model, "scaled_lorsum", **hparams)
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        x = torch.randn(8, W, generator=g, dtype=torch.float64).to(device)
        model(x).square().mean().backward()
        with guard(opt) if step else contextlib.nullcontext():
            opt.step()
        opt.zero_grad()
    assert all(int(opt.state[p.B]["step"]) == 3 for p in opt.capture.pairs)


@pytest.mark.parametrize("metric", ["kfac", "shampoo"])
def test_a_stacked_step_reads_nothing_back(metric):
    _steps_reading_nothing_back(metric, "cpu", lambda opt: no_host_reads(step_counters(opt)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("metric", ["kfac", "shampoo"])
def test_a_stacked_cuda_step_does_not_synchronise(metric):
    _steps_reading_nothing_back(metric, "cuda", cuda_sync_is_an_error)
