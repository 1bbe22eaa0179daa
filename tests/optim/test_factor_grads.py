"""``factor_grads=False``: autograd skips ``A.grad`` and ``B.grad``, which LoRSum never reads.

The trajectory must be the one with autograd's factor gradients (float64, to rounding), the
factors must get no ``.grad`` and be trainable again after ``remove()``, and what the mode
cannot do (loss scaling by ``GradScaler``, stepping in backward, baselines that need
``.grad``) must be refused clearly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorsum
from tests.utils import mse, regression_batch, tiny_lora_model

CASES = [
    ("lorsum", {"lr": 0.3, "num_iters": 1}),
    ("lorsum", {"lr": 0.3, "num_iters": 3, "momentum": 0.9, "weight_decay": 0.01}),
    ("scaled_lorsum", {"lr": 0.3}),
    ("scaled_lorsum", {"lr": 0.3, "metric": "shampoo", "metric_form": "dense"}),
    ("svdlora", {"lr": 0.3, "momentum": 0.5}),
]
IDS = [f"{method}-{i}" for i, (method, _) in enumerate(CASES)]


def _train(method, hparams, *, factor_grads, steps=4, max_grad_norm=None):
    model, pairs = tiny_lora_model()
    opt = lorsum.create_optimizer(
        model, method, dense_lr=0.01, factor_grads=factor_grads, max_grad_norm=max_grad_norm,
        **hparams,
    )  # fmt: skip
    grads_seen = []
    for step in range(steps):
        opt.zero_grad()
        x, y = regression_batch(16, seed=step)
        mse(model, x, y).backward()
        grads_seen += [p.A.grad is not None or p.B.grad is not None for p in pairs]
        opt.step()
    opt.capture.remove()
    return model, grads_seen


def _trainables(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize(("method", "hparams"), CASES, ids=IDS)
def test_skipping_the_factor_gradients_keeps_the_trajectory(method, hparams):
    # The first adapter's input is the data, which does not require grad: its branch is kept
    # differentiable by the capture itself.
    skipped, grads_seen = _train(method, hparams, factor_grads=False)
    kept, _ = _train(method, hparams, factor_grads=True)
    assert not any(grads_seen)
    for a, b in zip(_trainables(skipped), _trainables(kept), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_clipping_by_the_global_norm_needs_no_factor_gradients():
    skipped, _ = _train("lorsum", {"lr": 0.3}, factor_grads=False, max_grad_norm=0.05)
    kept, _ = _train("lorsum", {"lr": 0.3}, factor_grads=True, max_grad_norm=0.05)
    for a, b in zip(_trainables(skipped), _trainables(kept), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_factors_are_frozen_only_while_the_capture_is_active():
    model, pairs = tiny_lora_model()
    capture = lorsum.GradientCapture(pairs, factor_grads=False)
    assert not any(p.A.requires_grad or p.B.requires_grad for p in pairs)
    assert model[4].weight.requires_grad  # the dense head is untouched
    capture.remove()
    capture.remove()  # idempotent
    assert all(p.A.requires_grad and p.B.requires_grad for p in pairs)


def test_zero_grad_without_step_drops_the_rows():
    model, pairs = tiny_lora_model()
    opt = lorsum.create_optimizer(model, "lorsum", lr=0.3, factor_grads=False)
    x, y = regression_batch(16)
    mse(model, x, y).backward()
    assert all(opt.capture.peek(p.B) is not None for p in pairs)
    opt.zero_grad()  # a discarded batch: the window ends here, not at .grad (there is none)
    assert all(opt.capture.peek(p.B) is None for p in pairs)
    opt.capture.remove()


def test_micro_batches_accumulate_until_the_step():
    def train(factor_grads):
        model, _ = tiny_lora_model()
        opt = lorsum.create_optimizer(model, "lorsum", lr=0.3, factor_grads=factor_grads)
        for step in range(2):
            opt.zero_grad()
            for micro in range(3):
                x, y = regression_batch(8, seed=10 * step + micro)
                (mse(model, x, y) / 3).backward()
            opt.step()
        opt.capture.remove()
        return _trainables(model)

    for a, b in zip(train(False), train(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_autocast_rows_are_the_cast_inputs():
    # Under autocast nothing saves the down map's bf16 input any more: the capture keeps it in
    # the product's dtype (not the wider float32 input), with the values autograd would use.
    def train(factor_grads):
        model, pairs = tiny_lora_model(dtype=torch.float32)
        opt = lorsum.create_optimizer(model, "lorsum", lr=0.3, factor_grads=factor_grads)
        opt.capture.fold = False  # keep the rows to look at them
        x, y = regression_batch(16, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mse(model, x, y)
        loss.backward()
        dtypes = {X.dtype for p in pairs for _, X in opt.capture.peek(p.B).rows}
        opt.step()
        opt.capture.remove()
        return _trainables(model), dtypes

    (skipped, dtypes), (kept, _) = train(False), train(True)
    assert dtypes == {torch.bfloat16}
    for a, b in zip(skipped, kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_non_reentrant_checkpointing_records_the_same_rows():
    from torch.utils.checkpoint import checkpoint

    def train(use_checkpoint):
        model, _ = tiny_lora_model()
        opt = lorsum.create_optimizer(model, "lorsum", lr=0.3, factor_grads=False)
        x, y = regression_batch(16)
        body, head = model[:4], model[4]
        h = checkpoint(body, x, use_reentrant=False) if use_checkpoint else body(x)
        (head(h) - y).square().mean().backward()
        opt.step()
        opt.capture.remove()
        return _trainables(model)

    for a, b in zip(train(True), train(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_peft_llama_trains_without_factor_gradients():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=16,
    )  # fmt: skip
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def train(factor_grads):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).double()
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets)
        model = peft.get_peft_model(model, lora)
        opt = lorsum.create_optimizer(
            model, "lorsum", lr=0.5, momentum=0.5, factor_grads=factor_grads
        )
        tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad()
        opt.capture.remove()
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    for a, b in zip(train(False), train(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    ("method", "hparams", "match"),
    [
        ("adamw", {}, "factor_grads=False: method 'adamw' steps with autograd's"),
        ("precond_sgd", {}, "factor_grads=False: method 'precond_sgd'"),
        ("lora_pro", {}, "factor_grads=False: method 'lora_pro'"),
    ],
)
def test_what_needs_the_factor_gradients_is_refused(method, hparams, match):
    model, pairs = tiny_lora_model()
    with pytest.raises(ValueError, match=match):
        lorsum.create_optimizer(model, method, factor_grads=False, **hparams)
    assert all(p.A.requires_grad and p.B.requires_grad for p in pairs)  # nothing left frozen


def test_loss_scaling_is_refused():
    _, pairs = tiny_lora_model()
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="factor_grads=False with a grad_scaler"):
        lorsum.GradientCapture(pairs, grad_scaler=scaler, factor_grads=False)


def test_an_invalid_flag_is_refused():
    _, pairs = tiny_lora_model()
    with pytest.raises(ValueError, match="Invalid factor_grads: 'no'"):
        lorsum.GradientCapture(pairs, factor_grads="no")


def test_a_model_whose_only_trainables_are_adapters_still_backpropagates():
    # With every adapter frozen for autograd and no other trainable parameter, the loss would
    # not require grad at all, were the capture not to keep the branches differentiable.
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    for p in model.parameters():
        p.requires_grad_(False)
    pairs = lorsum.add_lora(model, ["0", "2"], rank=2)
    opt = lorsum.create_optimizer(model, "lorsum", lr=0.3, factor_grads=False)
    x, y = regression_batch(16)
    loss = (model(x) - y).square().mean()
    assert loss.requires_grad
    loss.backward()
    before = [p.B.detach().clone() for p in pairs]
    opt.step()
    assert all(not torch.equal(b, p.B) for b, p in zip(before, pairs, strict=True))
    opt.capture.remove()
