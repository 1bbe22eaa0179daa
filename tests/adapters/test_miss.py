"""Bone / MiSS through PEFT and lorsum's Bat layer (spec: related-methods §5).

Covers every §5.4 invariant: zero init preserves the function (balance, mini, Bat); the forward
equals ``x (W + Dᵀ S)ᵀ`` with a literal chunk-sum matrix ``S``, also when ``r ∤ n``; merge then
unmerge round-trips (PEFT's three variants and :class:`BatLinear`); ``rank(ΔW) <= r``; the
parameter counts ``r·m``, ``r·mini_r`` and ``m·r``; autograd's ``∂L/∂D = S Gᵀ`` (and Bat's
``Σ_j (W_ij + I)ᵀ G_ij``); parity of ``BatLinear`` with PEFT's ``init_weights="bat"``. Also:
``miss_config``'s mapping, PEFT ``save_pretrained``/``from_pretrained`` and Bat's own state dict
round trips, 20 AdamW steps that lower a regression loss for both, ``add_bat``'s suffix
matching, a hypothesis property of the Bat identity over shapes, and every error we raise.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorsum.adapters.miss import (  # noqa: E402
    BatLinear,
    add_bat,
    bat_delta_weight,
    bat_state_dict,
    bat_unmerge_weight,
    load_bat_state_dict,
    miss_config,
    miss_parameter_count,
    miss_trainable_parameters,
)
from tests.integrations.tiny_models import SEQ, VOCAB, bert_config  # noqa: E402
from tests.reference import rel_err  # noqa: E402
from tests.utils import generator, randn  # noqa: E402

# float64 comparisons of the same maths computed in a different order: rounding only.
EXACT = 1e-10


# --- oracles and builders --------------------------------------------------------------------


def chunk_sum_matrix(r: int, n: int) -> torch.Tensor:
    """``S = [I_r I_r … I_r] ∈ R^{r×n}`` truncated to ``n`` columns: ``S[a, k] = [k mod r = a]``."""
    return (torch.arange(n)[None, :] % r == torch.arange(r)[:, None]).double()


def miss_reference_weight(W0, D, *, mini_r: int | None = None) -> torch.Tensor:
    """``W0 + Dᵀ S``, with ``D (r, mini_r)`` first tiled to ``(r, m)`` for the mini variant."""
    m, n = W0.shape
    if mini_r is not None:
        D = D.repeat(1, m // mini_r)
    return W0 + D.T @ chunk_sum_matrix(D.shape[0], n)


def bat_reference_delta(W, D) -> torch.Tensor:
    """``ΔW_ij = W_ij D_i + D_i``, one ``r × r`` block at a time."""
    p, r, _ = D.shape
    delta = torch.empty_like(W)
    for i in range(p):
        for j in range(W.shape[1] // r):
            block = W[i * r : (i + 1) * r, j * r : (j + 1) * r]
            delta[i * r : (i + 1) * r, j * r : (j + 1) * r] = block @ D[i] + D[i]
    return delta


def random_linear(n: int, m: int, *, seed: int, bias: bool = True, dtype=torch.float64):
    layer = nn.Linear(n, m, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(randn(m, n, seed=seed, dtype=dtype))
        if bias:
            layer.bias.copy_(randn(m, seed=seed + 1, dtype=dtype))
    return layer


def fill_(param: torch.Tensor, *, seed: int, std: float = 0.1) -> None:
    """Random, small ``D``: ``I + D_i`` stays well-conditioned (cond ≤ ~3 for r ≤ 8)."""
    with torch.no_grad():
        param.copy_(std * randn(*param.shape, seed=seed, dtype=param.dtype))


def peft_single_linear(m: int, n: int, r: int, *, seed: int, **config) -> nn.Module:
    """A float64 PEFT model around one random ``nn.Linear(n, m)`` (module name ``"0"``)."""
    model = nn.Sequential(random_linear(n, m, seed=seed))
    return peft.get_peft_model(model, miss_config(["0"], r, **config))


def only_layer(model: nn.Module):
    return next(m for m in model.modules() if isinstance(m, peft.tuners.miss.MissLayer))


def tiny_bert(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():  # BERT's init draws from the global generator: keep it local
        torch.manual_seed(seed)
        return transformers.BertModel(bert_config()).double().eval()


def bert_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (3, SEQ), generator=generator(seed))}


def bert_out(model: nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(**bert_inputs(seed)).last_hidden_state


def linear_shapes(model: nn.Module, suffixes: tuple[str, ...]) -> list[tuple[int, int]]:
    return [
        (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] in suffixes
    ]


def tiny_mlp(seed: int) -> nn.Sequential:
    return nn.Sequential(
        random_linear(8, 16, seed=seed), nn.Tanh(), random_linear(16, 4, seed=seed + 2)
    )


def train_adamw(model: nn.Module, params, *, steps: int = 20, lr: float = 1e-2) -> list[float]:
    x, y = randn(64, 8, seed=7), randn(64, 4, seed=8)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# --- miss_config and the parameter-count formula ---------------------------------------------


@pytest.mark.parametrize(
    ("variant", "mini_r", "init_weights", "peft_mini_r"),
    [("balance", None, True, 1), ("mini", 8, "mini", 8), ("bat", None, "bat", 1)],
)
def test_miss_config_maps_variants_to_peft(variant, mini_r, init_weights, peft_mini_r):
    config = miss_config(["query", "value"], 16, variant=variant, mini_r=mini_r)
    assert isinstance(config, peft.MissConfig)
    assert config.init_weights == init_weights
    assert (config.r, config.mini_r, config.miss_dropout) == (16, peft_mini_r, 0.0)
    assert config.target_modules == {"query", "value"}


def test_miss_config_defaults_are_the_papers():
    config = miss_config("all-linear", bias="none")
    assert (config.r, config.init_weights, config.miss_dropout) == (64, True, 0.0)
    assert (config.target_modules, config.bias) == ("all-linear", "none")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "bone"}, r"Invalid variant: 'bone'"),
        ({"r": 0}, r"Invalid r: 0 \(must be an int >= 1\)"),
        ({"r": True}, r"Invalid r: True"),
        ({"variant": "mini"}, r"variant='mini' needs mini_r"),
        ({"variant": "mini", "mini_r": 0}, r"Invalid mini_r: 0"),
        ({"mini_r": 4}, r"mini_r=4 is only used by variant='mini', not 'balance'"),
        ({"dropout": 1.0}, r"Invalid dropout: 1.0"),
        ({"variant": "bat", "dropout": 0.1}, r"dropout=0.1 with variant='bat'"),
        ({"init_weights": False}, r"init_weights=False: choose the variant"),
    ],
)
def test_miss_config_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        miss_config(["query"], **kwargs)


def test_miss_parameter_count_hand_computed():
    shapes = [(32, 32), (37, 32), (32, 37)]
    assert miss_parameter_count(shapes, 4) == 4 * (32 + 37 + 32)
    assert miss_parameter_count(shapes[:1], 4, variant="mini", mini_r=8) == 4 * 8
    assert miss_parameter_count([(32, 32), (32, 16)], 4, variant="bat") == 32 * 4 * 2
    assert miss_parameter_count([], 4) == 0


@pytest.mark.parametrize(
    ("shapes", "kwargs", "match"),
    [
        ([(8, 8)], {"variant": "lora"}, r"Invalid variant: 'lora'"),
        ([(8, 8)], {"r": -1}, r"Invalid r: -1"),
        ([(8, 8)], {"variant": "mini"}, r"variant='mini' needs mini_r"),
        ([(8, 8)], {"variant": "mini", "mini_r": 2.0}, r"Invalid mini_r: 2.0"),
        ([(8, 8)], {"mini_r": 2}, r"mini_r=2 is only used by variant='mini', not 'balance'"),
        ([(8,)], {}, r"Invalid layer shape: \(8,\) \(must be \(out_features, in_features\)\)"),
        ([(8, 0)], {}, r"Invalid layer shape: \(8, 0\) \(sizes must be ints >= 1\)"),
        ([(8, 2)], {}, r"r=4 exceeds in_features=2 of a layer of shape \(8, 2\)"),
        ([(6, 8)], {"variant": "mini", "mini_r": 4}, r"mini_r=4 does not divide out_features=6"),
        ([(6, 8)], {"variant": "bat"}, r"\(out_features, in_features\) = \(6, 8\), block_size = 4"),
    ],
)
def test_miss_parameter_count_rejects_bad_input(shapes, kwargs, match):
    kwargs = {"r": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        miss_parameter_count(shapes, **kwargs)


@pytest.mark.parametrize(
    ("variant", "mini_r", "targets"),
    [
        ("balance", None, ("query", "key", "value", "dense")),  # dense: 37 wide, r ∤ n and m
        ("mini", 8, ("query", "key", "value")),
        ("bat", None, ("query", "key", "value")),
    ],
)
def test_peft_trainable_count_matches_paper_formula(variant, mini_r, targets):
    base = tiny_bert()
    shapes = linear_shapes(base, targets)
    model = peft.get_peft_model(base, miss_config(list(targets), 4, variant=variant, mini_r=mini_r))
    blocks = miss_trainable_parameters(model)
    expected = miss_parameter_count(shapes, 4, variant=variant, mini_r=mini_r)
    assert len(blocks) == len(shapes)
    assert sum(p.numel() for p in blocks.values()) == expected
    assert model.get_nb_trainable_parameters()[0] == expected


# --- PEFT's MiSS against the paper's definition ----------------------------------------------


@pytest.mark.parametrize(
    ("variant", "mini_r", "targets"),
    [
        ("balance", None, ["query", "key", "value", "dense"]),
        ("mini", 8, ["query", "key", "value"]),
        ("bat", None, ["query", "key", "value"]),
    ],
)
def test_peft_miss_starts_as_the_base_model(variant, mini_r, targets):
    base = tiny_bert()
    expected = bert_out(base)
    model = peft.get_peft_model(base, miss_config(targets, 4, variant=variant, mini_r=mini_r))
    assert torch.equal(bert_out(model), expected)


@pytest.mark.parametrize(
    ("m", "n", "r", "mini_r"),
    [
        (6, 8, 4, None),  # r | n
        (6, 10, 4, None),  # r ∤ n: x is zero-padded, ΔW's last block is truncated
        (5, 7, 7, None),  # r = n: one chunk
        (6, 9, 1, None),  # r = 1: ΔW = dᵀ 1ᵀ, one shared column
        (6, 10, 4, 3),  # mini: D (4, 3) tiled twice along the outputs
        (8, 8, 2, 8),  # mini_r = m: mini is balance
    ],
)
def test_peft_miss_forward_is_chunk_sum_identity(m, n, r, mini_r):
    variant = "balance" if mini_r is None else "mini"
    model = peft_single_linear(m, n, r, seed=m + n + r, variant=variant, mini_r=mini_r)
    layer = only_layer(model)
    D = layer.miss_block["default"]
    assert tuple(D.shape) == ((r, m) if mini_r is None else (r, mini_r))
    fill_(D, seed=11)
    x = randn(5, 3, n, seed=12)  # any leading dimensions
    W = miss_reference_weight(layer.base_layer.weight, D.detach(), mini_r=mini_r)
    expected = x @ W.T + layer.base_layer.bias
    with torch.no_grad():
        got = model(x)
    assert rel_err(got, expected) <= EXACT, (rel_err(got, expected), (m, n, r, mini_r))


@pytest.mark.parametrize(("m", "n", "r"), [(6, 8, 4), (6, 10, 4), (12, 16, 2)])
def test_peft_miss_gradient_is_chunk_sum_of_full_gradient(m, n, r):
    """``∂L/∂D = S Gᵀ`` with ``G = ∂L/∂W`` taken at the effective weight."""
    model = peft_single_linear(m, n, r, seed=3)
    layer = only_layer(model)
    D = layer.miss_block["default"]
    fill_(D, seed=4)
    x, target = randn(9, n, seed=5), randn(9, m, seed=6)
    (model(x) - target).square().sum().backward()

    W = miss_reference_weight(layer.base_layer.weight, D.detach()).requires_grad_()
    (torch.nn.functional.linear(x, W, layer.base_layer.bias) - target).square().sum().backward()
    expected = chunk_sum_matrix(r, n) @ W.grad.T
    assert rel_err(D.grad, expected) <= EXACT, rel_err(D.grad, expected)


@pytest.mark.parametrize(("m", "n", "r"), [(12, 16, 4), (12, 18, 4), (9, 20, 3)])
def test_peft_miss_update_has_rank_at_most_r(m, n, r):
    model = peft_single_linear(m, n, r, seed=21)
    layer = only_layer(model)
    fill_(layer.miss_block["default"], seed=22, std=1.0)
    W0 = layer.base_layer.weight.clone()
    model.merge_adapter()
    delta = layer.base_layer.weight - W0
    assert torch.linalg.matrix_rank(delta).item() == r  # generic D: exactly r, so at most r


@pytest.mark.parametrize(
    ("variant", "mini_r", "n", "unmerge_bound"),
    [
        ("balance", None, 10, EXACT),  # r ∤ n exercises PEFT's remainder branch
        ("mini", 3, 8, EXACT),
        # PEFT inverts I + D_i in float32 even for float64 weights, so its Bat unmerge is only
        # float32-accurate (~1e-8 here); BatLinear's solve is exact (see its test below).
        ("bat", None, 8, 1e-6),
    ],
)
def test_peft_miss_merge_unmerge_round_trips(variant, mini_r, n, unmerge_bound):
    model = peft_single_linear(
        6, n, 2 if variant == "bat" else 4, seed=31, variant=variant, mini_r=mini_r
    )
    layer = only_layer(model)
    fill_(layer.miss_block["default"], seed=32)
    W0 = layer.base_layer.weight.clone()
    x = randn(7, n, seed=33)
    with torch.no_grad():
        unmerged_out = model(x)
        model.merge_adapter()
        merged_out = model(x)
    assert layer.merged
    assert rel_err(merged_out, unmerged_out) <= EXACT
    model.unmerge_adapter()
    assert rel_err(layer.base_layer.weight, W0) <= unmerge_bound, rel_err(
        layer.base_layer.weight, W0
    )


def test_peft_miss_save_pretrained_round_trip(tmp_path):
    targets = ["query", "key", "value", "dense"]
    model = peft.get_peft_model(tiny_bert(), miss_config(targets, 4))
    for k, block in enumerate(miss_trainable_parameters(model).values()):
        fill_(block, seed=40 + k)
    expected = bert_out(model)
    model.save_pretrained(tmp_path)

    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert torch.equal(bert_out(loaded), expected)
    # from_pretrained loads for inference by default: nothing is left to train.
    with pytest.raises(ValueError, match=r"has no trainable MiSS block"):
        miss_trainable_parameters(loaded)
    trainable = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    assert len(miss_trainable_parameters(trainable)) == len(
        linear_shapes(tiny_bert(), ("query", "key", "value", "dense"))
    )


def test_peft_miss_training_with_adamw_lowers_the_loss():
    model = peft.get_peft_model(tiny_mlp(seed=50), miss_config(["0", "2"], 4))
    blocks = miss_trainable_parameters(model)
    assert [tuple(p.shape) for p in blocks.values()] == [(4, 16), (4, 4)]
    losses = train_adamw(model, blocks.values())
    assert losses[-1] < 0.9 * losses[0], losses


def test_miss_trainable_parameters_picks_the_adapter():
    model = peft.get_peft_model(tiny_mlp(seed=51), miss_config(["0", "2"], 4))
    model.add_adapter("mini", miss_config(["0"], 2, variant="mini", mini_r=4))
    assert list(miss_trainable_parameters(model)) == ["base_model.model.0", "base_model.model.2"]
    model.base_model.set_adapter(["default", "mini"])
    with pytest.raises(ValueError, match=r"2 active MiSS adapters \(\['default', 'mini'\]\)"):
        miss_trainable_parameters(model)
    mini = miss_trainable_parameters(model, "mini")
    assert [tuple(p.shape) for p in mini.values()] == [(2, 4)]
    with pytest.raises(ValueError, match=r"Unknown adapter_name: 'other' \(the MiSS layers hold"):
        miss_trainable_parameters(model, "other")


def test_miss_helpers_refuse_models_without_miss_layers():
    with pytest.raises(ValueError, match=r"Sequential has no PEFT MiSS layers"):
        miss_trainable_parameters(tiny_mlp(seed=52))


def test_lorsum_lora_optimizers_do_not_apply_to_miss():
    """MiSS trains no ``(B, A)`` pair, so the LoRA integration refuses it with a clear error."""
    from lorsum.integrations.peft import lora_pairs

    model = peft.get_peft_model(tiny_mlp(seed=53), miss_config(["0"], 4))
    with pytest.raises(ValueError, match=r"has no PEFT LoRA layers"):
        lora_pairs(model)


def test_miss_helpers_need_peft(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install lorsum\[peft\]"):
        miss_config(["query"])


# --- Bat: lorsum's layer ---------------------------------------------------------------------


def test_bat_delta_hand_computed():
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    D = torch.tensor([[[0.5]], [[2.0]]], dtype=torch.float64)  # r = 1: ΔW_ij = (W_ij + 1) d_i
    expected = torch.tensor([[1.0, 1.5], [8.0, 10.0]], dtype=torch.float64)
    assert torch.equal(bat_delta_weight(W, D), expected)
    assert torch.equal(bat_unmerge_weight(W + expected, D), W)


def test_bat_linear_starts_as_the_base_layer():
    base = random_linear(12, 8, seed=60)
    x = randn(5, 12, seed=61)
    expected = base(x).detach()
    layer = BatLinear(base, 4)
    assert tuple(layer.bat_block.shape) == (2, 4, 4)
    assert not torch.any(layer.bat_block)
    assert torch.equal(layer(x), expected)
    assert [p for p in layer.parameters() if p.requires_grad] == [layer.bat_block]


@pytest.mark.parametrize(("m", "n", "r"), [(8, 12, 4), (6, 6, 3), (4, 10, 2), (5, 5, 5)])
def test_bat_forward_matches_block_definition(m, n, r):
    layer = BatLinear(random_linear(n, m, seed=m * n), r)
    fill_(layer.bat_block, seed=r)
    W0 = layer.base.weight
    delta = bat_reference_delta(W0, layer.bat_block.detach())
    assert rel_err(layer.delta_weight(), delta) <= EXACT
    x = randn(3, 2, n, seed=62)
    expected = x @ (W0 + delta).T + layer.base.bias
    assert rel_err(layer(x), expected) <= EXACT


def test_bat_gradient_is_the_weight_guided_sum():
    """``∂L/∂D_i = Σ_j (W_ij + I)ᵀ G_ij`` with ``G = ∂L/∂W`` at the effective weight."""
    m, n, r = 8, 12, 4
    layer = BatLinear(random_linear(n, m, seed=70), r)
    fill_(layer.bat_block, seed=71)
    x, target = randn(9, n, seed=72), randn(9, m, seed=73)
    (layer(x) - target).square().sum().backward()

    W0 = layer.base.weight
    W = (W0 + bat_reference_delta(W0, layer.bat_block.detach())).requires_grad_()
    (torch.nn.functional.linear(x, W, layer.base.bias) - target).square().sum().backward()
    eye = torch.eye(r, dtype=torch.float64)
    expected = torch.stack(
        [
            sum(
                (W0[i * r : (i + 1) * r, j * r : (j + 1) * r] + eye).T
                @ W.grad[i * r : (i + 1) * r, j * r : (j + 1) * r]
                for j in range(n // r)
            )
            for i in range(m // r)
        ]
    )
    assert rel_err(layer.bat_block.grad, expected) <= EXACT


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float64, EXACT), (torch.float32, 1e-5)])
def test_bat_merge_unmerge_is_exact(dtype, bound):
    layer = BatLinear(random_linear(16, 8, seed=80, dtype=dtype), 4)
    fill_(layer.bat_block, seed=81)
    W0 = layer.base.weight.clone()
    x = randn(6, 16, seed=82, dtype=dtype)
    with torch.no_grad():
        unmerged_out = layer(x)
        layer.merge()
        merged_out = layer(x)
    assert layer.merged
    assert rel_err(merged_out, unmerged_out) <= bound
    assert rel_err(layer.base.weight, W0 + bat_reference_delta(W0, layer.bat_block)) <= bound
    layer.unmerge()
    assert not layer.merged
    assert layer.base.weight.dtype == dtype
    assert rel_err(layer.base.weight, W0) <= bound, rel_err(layer.base.weight, W0)


@settings(max_examples=25)
@given(
    r=st.integers(1, 4),
    blocks_out=st.integers(1, 4),
    blocks_in=st.integers(1, 4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bat_identity_property(r, blocks_out, blocks_in, bias, seed):
    m, n = r * blocks_out, r * blocks_in
    layer = BatLinear(random_linear(n, m, seed=seed, bias=bias), r)
    fill_(layer.bat_block, seed=seed + 2)
    W0 = layer.base.weight.clone()
    x = randn(4, n, seed=seed + 3)
    expected = x @ (W0 + bat_reference_delta(W0, layer.bat_block.detach())).T
    if bias:
        expected = expected + layer.base.bias
    with torch.no_grad():
        out = layer(x)
        assert rel_err(out, expected) <= EXACT, (rel_err(out, expected), m, n, r)
        layer.merge()
        assert rel_err(layer(x), expected) <= EXACT
        layer.unmerge()
    assert rel_err(layer.base.weight, W0) <= EXACT, (rel_err(layer.base.weight, W0), m, n, r)


def test_bat_linear_matches_peft_bat():
    """Invariant 7: the same ``D`` gives the same model as PEFT's ``init_weights="bat"``."""
    targets = ["query", "key", "value"]
    ours = tiny_bert()
    layers = add_bat(ours, targets, 4)
    theirs = peft.get_peft_model(tiny_bert(), miss_config(targets, 4, variant="bat"))
    blocks = miss_trainable_parameters(theirs)
    assert len(blocks) == len(layers) == 6
    for k, (layer, block) in enumerate(zip(layers, blocks.values(), strict=True)):
        assert block.shape == layer.bat_block.shape
        fill_(block, seed=90 + k)
        fill_(layer.bat_block, seed=90 + k)
    assert rel_err(bert_out(ours), bert_out(theirs)) <= EXACT
    theirs.merge_adapter()
    for layer, path in zip(layers, blocks, strict=True):
        merged = theirs.get_submodule(path).base_layer.weight
        assert rel_err(layer.base.weight + layer.delta_weight(), merged) <= EXACT


def test_bat_trainable_count_matches_paper_formula():
    model = tiny_bert().requires_grad_(False)  # add_bat freezes only the layers it wraps
    targets = ("query", "key", "value", "attention.output.dense")
    layers = add_bat(model, list(targets), 8)
    shapes = [(m.base.out_features, m.base.in_features) for m in layers]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == miss_parameter_count(shapes, 8, variant="bat") == 8 * 32 * 4 * 2


def test_add_bat_matches_names_by_suffix():
    model = tiny_bert()
    layers = add_bat(model, "attention.self.query", 4)
    assert [layer.name for layer in layers] == [
        f"encoder.layer.{i}.attention.self.query" for i in range(2)
    ]
    layers = add_bat(model, ["encoder.layer.1.attention.self.key", "value"], 4)
    assert [layer.name for layer in layers] == [
        "encoder.layer.0.attention.self.value",
        "encoder.layer.1.attention.self.key",
        "encoder.layer.1.attention.self.value",
    ]
    assert isinstance(model.encoder.layer[0].attention.self.key, nn.Linear)  # not targeted


def test_bat_save_load_round_trip(tmp_path):
    targets = ["query", "value", "attention.output.dense"]
    model = tiny_bert().requires_grad_(False)
    for k, layer in enumerate(add_bat(model, targets, 4)):
        fill_(layer.bat_block, seed=100 + k)
    expected = bert_out(model)
    state = bat_state_dict(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    torch.save(state, tmp_path / "bat.pt")

    fresh = tiny_bert()
    add_bat(fresh, targets, 4)
    assert not torch.equal(bert_out(fresh), expected)
    load_bat_state_dict(fresh, torch.load(tmp_path / "bat.pt", weights_only=True))
    assert torch.equal(bert_out(fresh), expected)


def test_bat_training_with_adamw_lowers_the_loss():
    model = tiny_mlp(seed=110)
    layers = add_bat(model, ["0", "2"], 4)
    assert [tuple(layer.bat_block.shape) for layer in layers] == [(4, 4, 4), (1, 4, 4)]
    losses = train_adamw(model, [layer.bat_block for layer in layers])
    assert losses[-1] < 0.9 * losses[0], losses


# --- Bat errors ------------------------------------------------------------------------------


def test_bat_linear_rejects_bad_construction():
    with pytest.raises(TypeError, match=r"BatLinear adapts nn.Linear layers, got Conv1d"):
        BatLinear(nn.Conv1d(4, 4, 1), 2)
    with pytest.raises(ValueError, match=r"Invalid block_size: 0 \(must be an int >= 1\)"):
        BatLinear(nn.Linear(4, 4), 0)
    with pytest.raises(ValueError, match=r"\(out_features, in_features\) = \(6, 8\), block_size"):
        BatLinear(nn.Linear(8, 6), 4)


def test_bat_merge_state_errors():
    layer = BatLinear(random_linear(4, 4, seed=120), 2, name="proj")
    with pytest.raises(ValueError, match=r"BatLinear 'proj' is not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(ValueError, match=r"BatLinear 'proj' is already merged"):
        layer.merge()
    with pytest.raises(ValueError, match=r"'proj' is merged, .* call unmerge\(\) before"):
        layer.delta_weight()


def test_bat_unmerge_refuses_a_singular_block():
    layer = BatLinear(random_linear(4, 4, seed=121), 2)
    with torch.no_grad():
        layer.bat_block[1] = -torch.eye(2, dtype=torch.float64)  # I + D_1 = 0
    layer.merge()
    with pytest.raises(ValueError, match=r"I \+ D_i is singular for output blocks \[1\]"):
        layer.unmerge()


@pytest.mark.parametrize(
    ("weight_shape", "block_shape", "match"),
    [
        ((4, 4), (2, 2), r"Bat needs weight \(m, n\) and bat_block \(m/r, r, r\)"),
        ((4, 4), (2, 2, 1), r"Bat needs weight \(m, n\) and bat_block"),
        ((6, 4), (2, 2, 2), r"Bat shapes do not fit: weight \(6, 4\)"),
        ((4, 5), (2, 2, 2), r"Bat shapes do not fit: weight \(4, 5\)"),
    ],
)
def test_bat_functions_reject_bad_shapes(weight_shape, block_shape, match):
    W, D = torch.zeros(weight_shape), torch.zeros(block_shape)
    with pytest.raises(ValueError, match=match):
        bat_delta_weight(W, D)
    with pytest.raises(ValueError, match=match):
        bat_unmerge_weight(W, D)


@pytest.mark.parametrize(
    ("targets", "block_size", "match"),
    [
        (["query", "qkv"], 4, r"no module of BertModel matches 'qkv'"),
        ([], 4, r"target_modules is empty"),
        (
            ["attention"],
            4,
            r"'encoder.layer.0.attention' \(matched by 'attention'\) is a "
            r"BertAttention, not an nn.Linear",
        ),
        (["embeddings"], 4, r"is a BertEmbeddings, not an nn.Linear"),
        (["query"], 0, r"Invalid block_size: 0"),
        (
            ["query"],
            5,
            r"'encoder.layer.0.attention.self.query' has \(out_features, "
            r"in_features\) = \(32, 32\), block_size = 5",
        ),
        # intermediate.dense is 32 -> 37: a block size that divides 32 still fails there.
        (["dense"], 4, r"'encoder.layer.0.intermediate.dense' has .* = \(37, 32\), block_size = 4"),
    ],
)
def test_add_bat_rejects_bad_targets(targets, block_size, match):
    model = tiny_bert()
    with pytest.raises(ValueError, match=match):
        add_bat(model, targets, block_size)
    assert not any(isinstance(m, BatLinear) for m in model.modules())  # checked before changing


def test_add_bat_refuses_an_adapted_layer():
    model = tiny_bert()
    add_bat(model, "query", 4)
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.self.query' is already a "):
        add_bat(model, "query", 4)


def test_bat_state_dict_errors():
    with pytest.raises(ValueError, match=r"Sequential has no BatLinear layers"):
        bat_state_dict(tiny_mlp(seed=130))
    with pytest.raises(ValueError, match=r"Sequential has no BatLinear layers"):
        load_bat_state_dict(tiny_mlp(seed=130), {})

    model = tiny_mlp(seed=131)
    add_bat(model, ["0", "2"], 4)
    state = {k: v.clone() for k, v in bat_state_dict(model).items()}
    with pytest.raises(ValueError, match=r"missing keys \['2.bat_block'\], unexpected \['x'\]"):
        load_bat_state_dict(model, {"0.bat_block": state["0.bat_block"], "x": state["2.bat_block"]})
    bad = {**state, "2.bat_block": torch.zeros(2, 4, 4)}
    with pytest.raises(ValueError, match=r"2.bat_block: saved shape \(2, 4, 4\) != the layer's"):
        load_bat_state_dict(model, bad)
    model[0].merge()
    with pytest.raises(ValueError, match=r"0.bat_block: the layer is merged; call unmerge\(\)"):
        load_bat_state_dict(model, state)
