"""``step_in_backward=True``: each pair stepped inside ``backward()``, its rows freed at once.

The trajectory must be the one ``step()`` gives (float64, to rounding), the capture must never
hold the rows of a layer whose backward is finished, and the two things in-backward stepping
cannot do (accumulate micro-batches, clip by a global norm) must be refused clearly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorsum
from tests.optim.stacks import record_stack_sizes, three_plus_one
from tests.utils import mse, regression_batch, tiny_lora_model

CASES = [
    ("lorsum", {"lr": 0.3, "num_iters": 0}),
    ("lorsum", {"lr": 0.3, "num_iters": 2, "damping": 1e-2}),
    ("lorsum", {"lr": 0.3, "num_iters": 1, "momentum": 0.9, "weight_decay": 0.01}),
    ("scaled_lorsum", {"lr": 0.3}),
    ("scaled_lorsum", {"lr": 0.3, "metric": "shampoo", "metric_form": "dense"}),
    ("svdlora", {"lr": 0.3, "momentum": 0.5}),
]
IDS = [f"{method}-{i}" for i, (method, _) in enumerate(CASES)]


def _train(
    method, hparams, *, step_in_backward, steps=4, scheduler=False, factor_grads=True, bucket=1
):
    model, _ = tiny_lora_model()
    opt = lorsum.create_optimizer(
        model, method, dense_lr=0.01, step_in_backward=step_in_backward,
        factor_grads=factor_grads, backward_bucket=bucket, **hparams,
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduler else None
    for step in range(steps):
        x, y = regression_batch(16, seed=step)
        mse(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
    opt.capture.remove()
    return model, opt


def _trainables(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("bucket", [1, 2, 100], ids=lambda k: f"bucket{k}")
@pytest.mark.parametrize("factor_grads", [True, False], ids=["factor-grads", "no-factor-grads"])
@pytest.mark.parametrize(("method", "hparams"), CASES, ids=IDS)
def test_stepping_in_backward_gives_the_trajectory_of_step(method, hparams, factor_grads, bucket):
    # Without factor gradients the completion signal is the down map's input gradient (the
    # second layer of the tiny model) or its output leaf (the first, whose input needs none).
    # A bucket of 2 or more steps the pairs together (the last ones when backward ends).
    inside, _ = _train(
        method, hparams, step_in_backward=True, factor_grads=factor_grads, bucket=bucket
    )
    after, _ = _train(method, hparams, step_in_backward=False)
    for a, b in zip(_trainables(inside), _trainables(after), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _four_same_layers(bucket=1, factor_grads=True):
    """Four stacked adapted ``Linear(10, 10)`` layers, LoRSum stepping them in backward."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(10, 10), nn.Tanh())]).double()
    pairs = lorsum.add_lora(model, ["0", "2", "4", "6"], rank=2)
    opt = lorsum.create_optimizer(
        model, "lorsum", lr=0.1, step_in_backward=True, backward_bucket=bucket,
        factor_grads=factor_grads,
    )  # fmt: skip
    return model, pairs, opt


@pytest.mark.parametrize(
    ("bucket", "stepped"), [(1, [1, 2, 3, 4]), (2, [0, 2, 2, 4]), (3, [0, 0, 3, 3])]
)
def test_a_bucket_is_stepped_when_full_and_its_rest_when_backward_ends(bucket, stepped):
    model, pairs, opt = _four_same_layers(bucket)
    seen = []

    def count_stepped(_B):  # registered after the optimizer's hook, so it runs after it
        seen.append(sum("step" in opt.state[p.B] for p in pairs))

    opt.capture.on_complete(count_stepped)
    model(torch.randn(32, 10, dtype=torch.float64)).square().sum().backward()
    assert seen == stepped
    assert all(int(opt.state[p.B]["step"]) == 1 for p in pairs)  # all stepped inside backward
    opt.step()
    assert all(int(opt.state[p.B]["step"]) == 1 for p in pairs)  # and not again
    opt.capture.remove()


def test_a_full_bucket_of_one_shape_is_one_stacked_step(monkeypatch):
    model, _, opt = _four_same_layers(4)
    stacks = record_stack_sizes(monkeypatch, type(opt))
    model(torch.randn(32, 10, dtype=torch.float64)).square().sum().backward()
    assert stacks == [4]  # one stack of the four pairs, not four steps of one
    opt.capture.remove()


def test_each_stack_fills_its_own_bucket(monkeypatch):
    # Backward completes the odd 40 → 6 layer first, then the three 40 → 40 ones: one shared
    # bucket of three would step the odd layer with two of them (stacks of 1 and 2, then 1).
    model = three_plus_one(40, 6)
    opt = lorsum.create_optimizer(model, "lorsum", lr=0.1, step_in_backward=True, backward_bucket=3)
    stacks = record_stack_sizes(monkeypatch, type(opt))
    model(torch.randn(8, 40, dtype=torch.float64)).square().sum().backward()
    assert stacks == [3, 1]  # the full bucket at once, the odd layer when backward ended
    opt.capture.remove()


def test_a_pair_stepped_alone_anyway_is_not_held_in_a_bucket(monkeypatch):
    from lorsum.optim import lorsum as lorsum_module

    monkeypatch.setattr(lorsum_module, "STACK_LIMIT", 1)  # every gradient too large to stack
    model, pairs, opt = _four_same_layers(bucket=100)
    seen = []
    opt.capture.on_complete(lambda _B: seen.append(sum("step" in opt.state[p.B] for p in pairs)))
    model(torch.randn(32, 10, dtype=torch.float64)).square().sum().backward()
    assert seen == [1, 2, 3, 4]  # each stepped as soon as complete, its rows freed at once
    opt.capture.remove()


@pytest.mark.parametrize(("bucket", "fold"), [(1, False), (4, True)])
def test_a_bucket_keeps_the_capture_memory_policy(bucket, fold):
    # Stepped at once, a layer's rows are a sweep's cheapest input; held in a bucket, they are
    # folded into m × n where that is smaller, as between backward and step().
    _, _, opt = _four_same_layers(bucket)
    assert opt.capture.fold is fold
    opt.capture.remove()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"step_in_backward": True, "backward_bucket": 0}, "Invalid backward_bucket: 0"),
        ({"step_in_backward": True, "backward_bucket": True}, "Invalid backward_bucket: True"),
        ({"step_in_backward": True, "backward_bucket": 2.0}, "Invalid backward_bucket: 2.0"),
        ({"backward_bucket": 2}, "backward_bucket=2 without step_in_backward=True"),
    ],
)
def test_an_invalid_backward_bucket_is_refused(kwargs, match):
    model, _ = tiny_lora_model()
    with pytest.raises(ValueError, match=match):
        lorsum.create_optimizer(model, "lorsum", lr=0.1, **kwargs)


def test_a_scheduled_learning_rate_reaches_the_in_backward_step():
    inside, _ = _train("lorsum", {"lr": 0.3}, step_in_backward=True, scheduler=True)
    after, _ = _train("lorsum", {"lr": 0.3}, step_in_backward=False, scheduler=True)
    constant, _ = _train("lorsum", {"lr": 0.3}, step_in_backward=True)
    for a, b in zip(_trainables(inside), _trainables(after), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(_trainables(inside)[0], _trainables(constant)[0])


@pytest.mark.parametrize("factor_grads", [True, False], ids=["factor-grads", "no-factor-grads"])
def test_a_finished_layer_keeps_no_rows_during_backward(factor_grads):
    # Four stacked adapted layers: when each one completes, its rows are consumed at once and
    # no other layer holds any (those below have not been reached yet).
    model, pairs, opt = _four_same_layers(factor_grads=factor_grads)
    held_at_completion = []

    def count_held(_B):  # registered after the optimizer's hook, so it runs after the step
        held_at_completion.append(sum(opt.capture.peek(p.B) is not None for p in pairs))

    opt.capture.on_complete(count_held)
    assert opt.capture.fold is False  # rows consumed at once are never folded into m × n
    x = torch.randn(32, 10, dtype=torch.float64)
    model(x).square().sum().backward()
    assert held_at_completion == [0, 0, 0, 0]
    assert all(int(opt.state[p.B]["step"]) == 1 for p in pairs)  # stepped before step()
    opt.step()
    assert all(int(opt.state[p.B]["step"]) == 1 for p in pairs)  # and not again
    opt.capture.remove()


def test_the_dense_groups_are_stepped_by_step():
    model, _ = tiny_lora_model()
    opt = lorsum.create_optimizer(model, "lorsum", lr=0.3, dense_lr=0.01, step_in_backward=True)
    head = model[4].weight
    before = head.detach().clone()
    x, y = regression_batch(16)
    mse(model, x, y).backward()
    torch.testing.assert_close(head, before, rtol=0, atol=0)  # untouched until step()
    opt.step()
    assert not torch.equal(head, before)
    opt.capture.remove()


@pytest.mark.parametrize("factor_grads", [True, False], ids=["factor-grads", "no-factor-grads"])
def test_a_second_backward_without_step_is_refused(factor_grads):
    model, _ = tiny_lora_model()
    opt = lorsum.create_optimizer(
        model, "lorsum", lr=0.3, step_in_backward=True, factor_grads=factor_grads
    )
    x, y = regression_batch(16)
    mse(model, x, y).backward()
    with pytest.raises(RuntimeError, match="cannot accumulate gradients"):
        mse(model, x, y).backward()
    opt.capture.remove()


@pytest.mark.parametrize("factor_grads", [True, False], ids=["factor-grads", "no-factor-grads"])
def test_zeroed_gradients_without_step_are_a_new_window(factor_grads):
    # GradScaler skips optimizer.step() after an overflow, then the loop zeroes the gradients:
    # the next backward is not an accumulation and must step normally.
    model, pairs = tiny_lora_model()
    opt = lorsum.create_optimizer(
        model, "lorsum", lr=0.3, step_in_backward=True, factor_grads=factor_grads
    )
    for seed in range(2):
        x, y = regression_batch(16, seed=seed)
        mse(model, x, y).backward()
        opt.zero_grad()
    assert int(opt.state[pairs[0].B]["step"]) == 2
    opt.capture.remove()


def test_a_non_finite_backward_leaves_the_factors_untouched():
    model, pairs = tiny_lora_model()
    opt = lorsum.create_optimizer(model, "lorsum", lr=0.3, step_in_backward=True)
    before = [p.detach().clone() for pair in pairs for p in (pair.A, pair.B)]
    x, y = regression_batch(16)
    x[3, 2] = float("nan")
    mse(model, x, y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite values"):
        opt.step()  # the skips happened in backward; step() reports them once
    after = [p.detach().clone() for pair in pairs for p in (pair.A, pair.B)]
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [int(opt.state[pair.B]["skipped_steps"]) for pair in pairs] == [1, 1]
    opt.capture.remove()


def test_the_group_positions_survive_load_state_dict():
    model, pairs = tiny_lora_model()
    opt = lorsum.create_optimizer(model, "lorsum", lr=0.3, step_in_backward=True)
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = 0.0  # the first pair frozen by its loaded group
    opt.load_state_dict(state)
    before = [(pair.B @ pair.A).detach().clone() for pair in pairs]
    x, y = regression_batch(16)
    mse(model, x, y).backward()
    after = [(pair.B @ pair.A).detach() for pair in pairs]
    torch.testing.assert_close(after[0], before[0], rtol=1e-12, atol=1e-14)  # lr 0: refit only
    assert (after[1] - before[1]).norm() > 1e-3 * before[1].norm()
    opt.capture.remove()


@pytest.mark.parametrize(
    ("method", "hparams", "match"),
    [
        ("lorsum", {"max_grad_norm": 1.0}, "max_grad_norm=1.0"),
        ("lorsum", {"step_in_backward": 1}, "Invalid step_in_backward: 1"),
        ("precond_sgd", {}, "method 'precond_sgd' steps with autograd's LoRA gradients"),
        ("lora_pro", {}, "method 'lora_pro' steps with autograd's LoRA gradients"),
        ("adamw", {}, "method 'adamw' steps with autograd's LoRA gradients"),
    ],
)
def test_what_cannot_step_in_backward_is_refused(method, hparams, match):
    model, _ = tiny_lora_model()
    hparams = {"step_in_backward": True, **hparams}
    with pytest.raises(ValueError, match=match):
        lorsum.create_optimizer(model, method, lr=0.1, **hparams)


def test_a_lora_optimizer_without_capture_cannot_step_in_backward():
    # The base class refuses it for any subclass that does not capture the full gradient.
    with pytest.raises(ValueError, match="PrecondLoRA steps with autograd's LoRA gradients"):
        lorsum.optim._base._check_step_in_backward(lorsum.PrecondLoRA, True, None)


@pytest.mark.parametrize("factor_grads", [True, False], ids=["factor-grads", "no-factor-grads"])
def test_a_peft_llama_steps_in_backward_like_step(factor_grads):
    # Every linear of the block adapted: q, k and v share one input, gate and up another.
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=16,
    )  # fmt: skip
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def train(step_in_backward, bucket=1):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).double()
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets)
        model = peft.get_peft_model(model, lora)
        opt = lorsum.create_optimizer(
            model, "lorsum", lr=0.5, momentum=0.5, step_in_backward=step_in_backward,
            factor_grads=factor_grads if step_in_backward else True, backward_bucket=bucket,
        )  # fmt: skip
        tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        for step in range(3):
            model(input_ids=tokens, labels=tokens).loss.backward()
            if step_in_backward:  # every pair was stepped inside backward, none left to step()
                steps = [int(s["step"]) for s in opt.state.values() if "skipped_steps" in s]
                assert len(steps) == 14  # 2 blocks × 7 linears
                assert set(steps) == {step + 1}
            opt.step()
            opt.zero_grad()
        opt.capture.remove()
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    reference = train(False)
    for bucket in (1, 5):  # 5: buckets that cut across blocks and shapes
        for a, b in zip(train(True, bucket), reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
