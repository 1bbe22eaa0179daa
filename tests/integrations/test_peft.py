"""The PEFT integration on tiny models built from local configs (nothing is downloaded).

Covers: pairs read from PEFT's adapter-keyed dicts (scaling with rsLoRA, rank and alpha
patterns), the captured gradient against autograd (with and without LoRA dropout, GPT-2's
``fan_in_fan_out``, ``lora_bias``), LoRSum steps on a PEFT model against the SVD projection and
the one-sweep / Jacobi closed forms, gradient accumulation, gradient checkpointing, eval and
``no_grad`` forwards, several adapters, dense parameters and groups, and every refusal.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorsum  # noqa: E402
from lorsum.functional import best_rank_r  # noqa: E402
from lorsum.integrations.peft import dense_parameters, lora_pairs, param_groups  # noqa: E402
from tests.integrations.tiny_models import SEQ, VOCAB, bert_config  # noqa: E402
from tests.reference import gauss_seidel_sweep, rel_err, riemannian_step  # noqa: E402


def peft_bert(*, seed: int = 0, B_std: float = 0.5, **lora_kwargs) -> nn.Module:
    """A float64 PEFT BERT classifier, LoRA on query/value, ``B ~ N(0, B_std²)`` (0: PEFT's 0)."""
    options = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "value"]}
    options.update(lora_kwargs)
    with torch.random.fork_rng():  # model init draws from the global generator: keep it local
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification(bert_config())
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", **options))
        model = model.double()
        if B_std > 0:
            with torch.no_grad():
                for pair in lora_pairs(model):
                    pair.B.normal_(std=B_std)
    return model.train()


def batch(size: int, *, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, VOCAB, (size, SEQ), generator=g),
        "labels": torch.randint(0, 2, (size,), generator=g),
    }


def layer_of(model: nn.Module, pair: lorsum.LoRAPair) -> nn.Module:
    return model.get_submodule(pair.name)


def base_weight_gradients(model: nn.Module, pairs, data) -> tuple[list[torch.Tensor], list]:
    """``∂L/∂W0`` of every adapted layer (made trainable here) and the captured ``G`` of each."""
    for pair in pairs:
        layer_of(model, pair).base_layer.weight.requires_grad_(True)
    with lorsum.GradientCapture(pairs) as capture:
        model(**data).loss.backward()
        captured = [capture.peek(pair.B).to_dense() for pair in pairs]
    return [layer_of(model, pair).base_layer.weight.grad for pair in pairs], captured


# --- pairs -------------------------------------------------------------------------------------


def test_pairs_are_read_from_the_adapter_dicts_with_per_layer_scaling():
    model = peft_bert(
        use_rslora=True, rank_pattern={"query": 2}, alpha_pattern={"value": 16}, B_std=0
    )
    pairs = lora_pairs(model)
    assert len(pairs) == 4
    for pair in pairs:
        layer = layer_of(model, pair)
        assert isinstance(layer, peft.tuners.lora.LoraLayer)
        assert pair.A is layer.lora_A["default"].weight
        assert pair.B is layer.lora_B["default"].weight
        assert pair.modules == (layer.lora_A["default"], layer.lora_B["default"])
        assert pair.scaling == layer.scaling["default"]
        # rsLoRA: alpha / sqrt(r), with the layer's own r and alpha
        expected = 8 / 2**0.5 if pair.name.endswith("query") else 16 / 4**0.5
        assert pair.scaling == pytest.approx(expected)
        assert pair.rank == (2 if pair.name.endswith("query") else 4)


def test_dense_parameters_are_the_other_trainable_parameters_and_get_one_group():
    model = peft_bert()
    pairs = lora_pairs(model)
    head = model.base_model.model.classifier.modules_to_save["default"]
    dense = dense_parameters(model, pairs)
    assert {id(p) for p in dense} == {id(head.weight), id(head.bias)}
    groups = param_groups(model, lr=0.1, num_iters=2, dense_lr=1e-2)
    assert [g["kind"] for g in groups] == ["lora"] * 4 + ["dense"]
    assert all(g["lr"] == 0.1 and g["num_iters"] == 2 for g in groups[:4])
    assert groups[-1]["lr"] == 1e-2
    assert {id(p) for p in groups[-1]["params"]} == {id(p) for p in dense}


def test_no_dense_group_when_only_the_adapters_train():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = transformers.BertModel(bert_config())
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query"]))
    groups = param_groups(model)
    assert [g["kind"] for g in groups] == ["lora", "lora"]


def test_lora_bias_is_a_dense_parameter_and_leaves_the_capture_exact():
    model = peft_bert(lora_bias=True)
    pairs = lora_pairs(model)
    biases = {id(layer_of(model, p).lora_B["default"].bias) for p in pairs}
    assert biases <= {id(p) for p in dense_parameters(model, pairs)}
    _, captured = base_weight_gradients(model, pairs, batch(4, seed=1))
    for pair, G in zip(pairs, captured, strict=True):
        torch.testing.assert_close(pair.A.grad, pair.B.T @ G, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(pair.B.grad, G @ pair.A.T, rtol=1e-12, atol=1e-14)


# --- the captured gradient ---------------------------------------------------------------------


def test_captured_gradient_is_the_scaling_times_the_base_weight_gradient():
    model = peft_bert()
    pairs = lora_pairs(model)
    grads, captured = base_weight_gradients(model, pairs, batch(4, seed=1))
    for pair, grad_W, G in zip(pairs, grads, captured, strict=True):
        torch.testing.assert_close(G, pair.scaling * grad_W, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(pair.A.grad, pair.B.T @ G, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(pair.B.grad, G @ pair.A.T, rtol=1e-12, atol=1e-14)


def test_with_lora_dropout_the_capture_is_the_gradient_of_the_dropped_out_branch():
    # Full rank (r = 32 = d): A.grad = BᵀG and B.grad = GAᵀ then determine G, so autograd's own
    # gradients prove that the capture used exactly the dropout mask of the forward.
    model = peft_bert(r=32, lora_alpha=16, lora_dropout=0.1)
    pairs = lora_pairs(model)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        grads, captured = base_weight_gradients(model, pairs, batch(4, seed=1))
    for pair, grad_W, G in zip(pairs, grads, captured, strict=True):
        from_A = torch.linalg.solve(pair.B.T, pair.A.grad)
        from_B = torch.linalg.solve(pair.A, pair.B.grad.T).T
        assert rel_err(G, from_A) < 1e-10, rel_err(G, from_A)
        assert rel_err(G, from_B) < 1e-10, rel_err(G, from_B)
        # dropout was active: the branch's gradient is not the base weight's
        assert rel_err(G, pair.scaling * grad_W) > 1e-3


def test_fan_in_fan_out_only_transposes_the_base_weight():
    config = transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=VOCAB
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = transformers.GPT2LMHeadModel(config)
        lora_config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
        model = peft.get_peft_model(base, lora_config).double().train()
        pairs = lora_pairs(model)
        with torch.no_grad():
            pairs[0].B.normal_()
    ids = batch(2, seed=1)["input_ids"]
    layer = layer_of(model, pairs[0])
    layer.base_layer.weight.requires_grad_(True)  # Conv1D: weight is (in, out)
    with lorsum.GradientCapture(pairs) as capture:
        model(input_ids=ids, labels=ids).loss.backward()
        G = capture.peek(pairs[0].B).to_dense()
    assert G.shape == (96, 32)
    torch.testing.assert_close(G, pairs[0].scaling * layer.base_layer.weight.grad.T)


def test_no_grad_and_eval_forwards_capture_nothing():
    model = peft_bert()
    pairs = lora_pairs(model)
    data = batch(4, seed=1)
    with lorsum.GradientCapture(pairs) as capture:
        with torch.no_grad():
            model(**data)
        assert all(capture.peek(p.B) is None for p in pairs)
        model.eval()
        model(**data)  # differentiable but never back-propagated
        assert all(capture.peek(p.B) is None for p in pairs)
        # An eval forward between a training forward and its backward changes nothing.
        model.train()
        loss = model(**data).loss
        model.eval()
        model(**batch(3, seed=9))
        loss.backward()
        captured = [capture.peek(p.B).to_dense() for p in pairs]
    twin = copy.deepcopy(model).train()
    twin.zero_grad()
    _, expected = base_weight_gradients(twin, lora_pairs(twin), data)
    for G, ref in zip(captured, expected, strict=True):
        torch.testing.assert_close(G, ref, rtol=0, atol=0)


# --- LoRSum steps on a PEFT model ---------------------------------------------------------------


def lorsum_step(model: nn.Module, data, **hparams):
    """One LoRSum step on ``model``'s adapters: the pairs, their initial factors and ∂L/∂W."""
    pairs = lora_pairs(model)
    inits = [(p.B.detach().clone(), p.A.detach().clone()) for p in pairs]
    with lorsum.GradientCapture(pairs) as capture:
        optimizer = lorsum.LoRSum(lorsum.pair_param_groups(pairs), capture=capture, **hparams)
        grads, _ = base_weight_gradients(model, pairs, data)
        optimizer.step()
    return pairs, inits, grads


def test_many_sweeps_take_the_svd_projected_full_fine_tuning_step():
    # B0 small and lr large so that the step is a sizeable part of W − W0 and the target's
    # spectrum has a gap at r (σ_{r+1}/σ_r ≤ 0.33 here): 200 sweeps then converge to rounding.
    lr = 50.0
    pairs, inits, grads = lorsum_step(
        peft_bert(B_std=1e-2), batch(8, seed=1), lr=lr, num_iters=200, damping=1e-12
    )
    for pair, (B0, A0), grad_W in zip(pairs, inits, grads, strict=True):
        s = pair.scaling
        start = s * B0 @ A0
        target = best_rank_r(start - lr * grad_W, pair.rank)  # Π_r(W − lr ∂L/∂W) − W0
        err = rel_err(s * pair.B @ pair.A - start, target - start)  # on the step itself
        assert err <= 1e-6, f"{pair.name}: rel_err of the step {err:.3e} > 1e-6"


@pytest.mark.parametrize("B_std", [1e-2, 0.0], ids=["B0-random", "B0-zero"])
@pytest.mark.parametrize("num_iters", [0, 1])
def test_one_sweep_and_the_jacobi_pass_are_their_closed_forms(num_iters, B_std):
    # LoRSum fits B'A' ≈ B0A0 − (lr/s²) G_s with G_s = s ∂L/∂W and proximal weight λ = damping·lr/s:
    # the reference closed forms with lr' = lr/s², G = G_s and damping' = λ.
    lr, damping = 20.0, 1e-3
    pairs, inits, grads = lorsum_step(
        peft_bert(B_std=B_std), batch(8, seed=1), lr=lr, num_iters=num_iters, damping=damping
    )
    closed_form = gauss_seidel_sweep if num_iters == 1 else riemannian_step
    for pair, (B0, A0), grad_W in zip(pairs, inits, grads, strict=True):
        s = pair.scaling
        B1, A1 = closed_form(B0, A0, s * grad_W, lr / s**2, damping * lr / s)
        for label, new, ref, old in (("A", pair.A, A1, A0), ("B", pair.B, B1, B0)):
            assert rel_err(new, ref) <= 1e-12, (pair.name, label, rel_err(new, ref))
            if ref is A1 and B_std == 0:
                # B0 = 0: A has no gradient; the ridge solve returns (λA0)/λ
                torch.testing.assert_close(new, old, rtol=1e-14, atol=0)
                continue
            # The step itself, to the precision its size allows (ε‖A‖/‖ΔA‖ is about 1e-11).
            err = rel_err(new - old, ref - old)
            assert err <= 1e-8, (pair.name, label, err)


def test_four_accumulated_micro_batches_equal_one_batch_of_four():
    hparams = {"lr": 0.5, "num_iters": 2, "damping": 1e-3}
    data = batch(8, seed=1)
    results = []
    for micro_batches in (1, 4):
        model = peft_bert()
        pairs = lora_pairs(model)
        with lorsum.GradientCapture(pairs) as capture:
            groups = param_groups(model, pairs, dense_lr=1e-2, **hparams)
            optimizer = lorsum.LoRSum(groups, capture=capture)
            chunks = zip(
                data["input_ids"].chunk(micro_batches),
                data["labels"].chunk(micro_batches),
                strict=True,
            )
            for input_ids, labels in chunks:
                loss = model(input_ids=input_ids, labels=labels).loss / micro_batches
                loss.backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
    for one, accumulated in zip(*results, strict=True):
        assert rel_err(accumulated, one) <= 1e-10, rel_err(accumulated, one)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_capture_and_step(use_reentrant):
    data = batch(4, seed=1)
    hparams = {"lr": 0.5, "num_iters": 1, "damping": 1e-3}
    results = []
    for checkpointing in (False, True):
        model = peft_bert()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
            model.enable_input_require_grads()  # reentrant checkpointing needs a grad-input
        pairs = lora_pairs(model)
        calls: list[int] = []
        handle = pairs[0].modules[0].register_forward_hook(lambda *_, c=calls: c.append(1))
        with lorsum.GradientCapture(pairs) as capture:
            optimizer = lorsum.LoRSum(lorsum.pair_param_groups(pairs, **hparams), capture=capture)
            model(**data).loss.backward()
            captured = [capture.peek(p.B).to_dense() for p in pairs]
            optimizer.step()
        handle.remove()
        assert len(calls) == (2 if checkpointing else 1)  # the layer really was recomputed
        results.append((captured, [p.detach().clone() for p in model.parameters()]))
    (G_plain, params_plain), (G_ckpt, params_ckpt) = results
    for G, ref in zip(G_ckpt, G_plain, strict=True):
        torch.testing.assert_close(G, ref, rtol=1e-13, atol=1e-15)
    for p, ref in zip(params_ckpt, params_plain, strict=True):
        torch.testing.assert_close(p, ref, rtol=1e-13, atol=1e-15)


# --- several adapters ----------------------------------------------------------------------------


def test_pairs_of_a_named_adapter_among_several():
    # An encoder without a task head: PEFT's modules_to_save cannot have two active adapters.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = transformers.BertModel(bert_config(), add_pooling_layer=False).double()
    model = peft.get_peft_model(encoder, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["value"]))
    assert [p.name for p in lora_pairs(model)] == [p.name for p in lora_pairs(model, "default")]

    model.set_adapter("other")
    pairs = lora_pairs(model)
    assert [p.rank for p in pairs] == [2, 2]
    assert all(p.scaling == 1.0 for p in pairs)
    assert all(p.A is layer_of(model, p).lora_A["other"].weight for p in pairs)
    with pytest.raises(ValueError, match=r"adapter 'default' is not active"):
        lora_pairs(model, "default")

    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"2 active LoRA adapters \(\['default', 'other'\]\)"):
        lora_pairs(model)
    pairs = lora_pairs(model, "other")
    with torch.no_grad():
        for p in pairs:
            p.B.normal_(generator=torch.Generator().manual_seed(5))
    with lorsum.GradientCapture(pairs) as capture:
        # both adapters run; only "other" is recorded
        model(batch(4, seed=1)["input_ids"]).last_hidden_state.square().mean().backward()
        for p in pairs:
            G = capture.peek(p.B).to_dense()
            torch.testing.assert_close(p.A.grad, p.B.T @ G, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(p.B.grad, G @ p.A.T, rtol=1e-12, atol=1e-14)


# --- refusals ------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.mha = nn.MultiheadAttention(8, 2)
        self.lin = nn.Linear(8, 8)


def test_a_model_without_lora_layers_is_refused():
    with pytest.raises(ValueError, match="BertForSequenceClassification has no PEFT LoRA layers"):
        lora_pairs(transformers.BertForSequenceClassification(bert_config()))


def test_an_unknown_adapter_name_is_refused():
    with pytest.raises(ValueError, match=r"Unknown adapter_name: 'nope'.*\['default'\]"):
        lora_pairs(peft_bert(), "nope")


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        ({"target_modules": ["conv"]}, r"'base_model\.model\.conv': conv LoRA is not supported"),
        ({"target_modules": ["emb"]}, r"'base_model\.model\.emb': embedding LoRA is not supported"),
        ({"target_modules": ["mha"]}, r"'base_model\.model\.mha': MultiheadAttention LoRA is not"),
        (
            {"target_modules": [], "target_parameters": ["lin.weight"]},
            r"'base_model\.model\.lin': target_parameters \(ParamWrapper\) LoRA is not supported",
        ),
    ],
    ids=["conv", "embedding", "multihead-attention", "target-parameters"],
)
def test_layers_the_capture_cannot_handle_are_refused_by_name(targets, match):
    model = peft.get_peft_model(_Net(), peft.LoraConfig(r=2, **targets))
    with pytest.raises(ValueError, match=match):
        lora_pairs(model)


def test_dora_is_refused_by_name():
    with pytest.raises(ValueError, match=r"layer\.0\.attention\.self\.query'.*uses DoRA"):
        lora_pairs(peft_bert(use_dora=True))


def test_merged_and_disabled_adapters_are_refused_by_name():
    model = peft_bert()
    with model.disable_adapter(), pytest.raises(ValueError, match=r"query': adapters are disabled"):
        lora_pairs(model)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"query': adapters \['default'\] are merged"):
        lora_pairs(model)
    model.unmerge_adapter()
    assert len(lora_pairs(model)) == 4


def test_frozen_adapters_are_left_out_and_none_left_is_refused():
    model = peft_bert(inference_mode=True, B_std=0)
    with pytest.raises(ValueError, match="adapter 'default' has no trainable LoRA layer"):
        lora_pairs(model)
    model = peft_bert()
    frozen = lora_pairs(model)[0]
    frozen.A.requires_grad_(False)
    frozen.B.requires_grad_(False)
    assert frozen.name not in [p.name for p in lora_pairs(model)]


def test_a_missing_peft_install_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install lorsum\[peft\]"):
        lora_pairs(nn.Linear(2, 2))


# --- the generic builder -------------------------------------------------------------------------


def test_create_optimizer_on_a_peft_model_takes_the_same_step_as_lorsum():
    factory = pytest.importorskip("lorsum.factory")
    hparams = {"lr": 0.5, "num_iters": 2, "damping": 1e-3}
    data = batch(4, seed=1)
    model, twin = peft_bert(), peft_bert()
    optimizer = factory.create_optimizer(model, "lorsum", dense_lr=1e-2, **hparams)
    assert [p.name for p in optimizer.capture.pairs] == [p.name for p in lora_pairs(model)]
    assert [g["kind"] for g in optimizer.param_groups] == ["lora"] * 4 + ["dense"]
    model(**data).loss.backward()
    optimizer.step()
    optimizer.capture.remove()

    pairs = lora_pairs(twin)
    with lorsum.GradientCapture(pairs) as capture:
        reference = lorsum.LoRSum(
            param_groups(twin, pairs, dense_lr=1e-2, **hparams), capture=capture
        )
        twin(**data).loss.backward()
        reference.step()
    for p, ref in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, ref, rtol=0, atol=0)
