"""GradientCapture: the captured G is autograd's (dropout and scaling included), eval and no-grad
forwards record nothing, micro-batches sum, windows end with .grad, memory stays within
min(N(m+n), mn), repeated calls of a layer add up, hooks come off, and every error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorsum
from lorsum import GradientCapture, LoRALinear
from tests import reference as ref
from tests.utils import randn, regression_batch, tiny_lora_model


def _base_grads(model, x, y):
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.base.weight.requires_grad_(True)
    (model(x) - y).square().mean().backward()
    grads = [layer.base.weight.grad.clone() for layer in layers]
    for layer in layers:
        layer.base.weight.requires_grad_(False)
        layer.base.weight.grad = None
    return grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_captured_gradient_is_scaling_times_autograds_full_gradient(dropout):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6)).double()
    pairs = lorsum.add_lora(model, ["0", "2"], rank=3, alpha=6.0, dropout=dropout)
    with torch.no_grad():
        for pair in pairs:
            pair.B.normal_()
    x, y = randn(16, 8, seed=1), randn(16, 6, seed=2)
    with GradientCapture(pairs) as capture:
        torch.manual_seed(3)  # one dropout mask, shared by autograd and the capture
        grads = _base_grads(model, x, y)
        for pair, G_w in zip(pairs, grads, strict=True):
            G = capture.peek(pair.B).to_dense()
            assert ref.rel_err(pair.A.grad, pair.B.T @ G) <= 1e-12  # exactly autograd's path
            assert ref.rel_err(pair.B.grad, G @ pair.A.T) <= 1e-12
            if dropout == 0:
                assert ref.rel_err(G, pair.scaling * G_w) <= 1e-12


def test_only_back_propagated_forwards_are_recorded():
    model, pairs = tiny_lora_model(seed=4)
    x, y = regression_batch(seed=5)
    with GradientCapture(pairs) as capture:
        with torch.no_grad():
            model(x)
        model.eval()
        model(x)  # an evaluation forward, never differentiated
        assert all(capture.peek(p.B) is None for p in pairs)
        (model(x) - y).square().mean().backward()  # training in eval mode (dropout off) counts
        assert all(capture.peek(p.B).num_rows == 32 for p in pairs)


def test_micro_batches_sum_and_a_zeroed_window_starts_over():
    model, pairs = tiny_lora_model(seed=6)
    x, y = regression_batch(seed=7)
    B = pairs[0].B
    with GradientCapture(pairs) as capture:
        (model(x[:16]) - y[:16]).square().sum().backward()
        first = capture.peek(B).to_dense().clone()
        (model(x[16:]) - y[16:]).square().sum().backward()
        both = capture.peek(B).to_dense().clone()
        model.zero_grad()  # no step: the next backward opens a new window
        (model(x[16:]) - y[16:]).square().sum().backward()
        second = capture.peek(B).to_dense()
    assert ref.rel_err(both, first + second) <= 1e-12


def test_rows_are_kept_until_the_dense_form_is_smaller():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(32, 32)).double()
    pairs = lorsum.add_lora(model, ["0"], rank=2)
    B = pairs[0].B
    x = randn(64, 32, seed=9)
    with GradientCapture(pairs) as capture:
        for i in range(4):  # 8 rows each: 8·(32+32) = 512 elements per batch, m·n = 1024
            model(x[8 * i : 8 * i + 8]).sum().backward()
            captured = capture.peek(B)
            rows_elements = captured.num_rows * 64
            assert (captured.dense is None) == (rows_elements <= 32 * 32)
            stored = sum(S.numel() + X.numel() for S, X in captured.rows)
            stored += 0 if captured.dense is None else captured.dense.numel()
            assert stored <= min(rows_elements, 32 * 32)
        G_stream = captured.to_dense().clone()
    with GradientCapture(pairs) as capture:
        model.zero_grad()
        model(x[:32]).sum().backward()
        assert ref.rel_err(capture.peek(B).to_dense(), G_stream) <= 1e-12


def test_without_folding_the_rows_are_kept_whatever_their_size():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(32, 32)).double()
    pairs = lorsum.add_lora(model, ["0"], rank=2)
    x = randn(64, 32, seed=9)  # 64·(32 + 32) = 4096 elements of rows, m·n = 1024
    with GradientCapture(pairs, fold=False) as capture:
        model(x).sum().backward()
        captured = capture.peek(pairs[0].B)
        assert captured.dense is None
        assert captured.num_rows == 64
        G_rows = captured.to_dense().clone()
    with GradientCapture(pairs) as capture:
        model.zero_grad()
        model(x).sum().backward()
        assert capture.peek(pairs[0].B).dense is not None  # folded by default
        assert ref.rel_err(capture.peek(pairs[0].B).to_dense(), G_rows) <= 1e-12


def test_on_complete_fires_once_per_backward_after_the_layers_last_row():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    pairs = lorsum.add_lora(model, ["0", "2"], rank=2)
    x = randn(5, 6, seed=11)
    seen = []
    with GradientCapture(pairs) as capture:
        capture.on_complete(lambda B: seen.append((B, capture.peek(B).num_rows, B.grad)))
        (model(x) + model(x)).sum().backward()  # every layer called twice
        # Backward reaches the last layer first; each fires once, with both calls' rows in.
        assert [b is p.B for (b, _, _), p in zip(seen, pairs[::-1], strict=True)] == [True] * 2
        assert [rows for _, rows, _ in seen] == [10, 10]
        assert all(grad is not None for _, _, grad in seen)
        with pytest.raises(TypeError, match="callback must be callable"):
            capture.on_complete("not a function")


def test_a_layer_called_twice_in_one_forward_adds_both_calls():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 6)).double()
    pairs = lorsum.add_lora(model, ["0"], rank=2)
    layer = model[0]
    with torch.no_grad():
        pairs[0].B.normal_()
    x = randn(5, 6, seed=11)
    with GradientCapture(pairs) as capture:
        layer.base.weight.requires_grad_(True)
        layer(torch.tanh(layer(x))).square().sum().backward()
        G = capture.peek(pairs[0].B).to_dense()
    assert ref.rel_err(G, layer.scaling * layer.base.weight.grad) <= 1e-12


def test_factored_squared_norm_equals_the_dense_one():
    model, pairs = tiny_lora_model(seed=12)
    x, y = regression_batch(rows=2, seed=13)  # few rows: the factored form is kept
    with GradientCapture(pairs) as capture:
        (model(x) - y).square().mean().backward()
        captured = capture.peek(pairs[0].B)
        assert captured.dense is None
        assert (
            abs(float(captured.squared_norm()) - float(captured.to_dense().square().sum())) <= 1e-12
        )


@pytest.mark.parametrize("statistics", ["diagonal", "dense"])
def test_metric_statistics_accumulate_over_micro_batches(statistics):
    model, pairs = tiny_lora_model(seed=14)
    x, y = regression_batch(seed=15)
    A = pairs[0].A
    inputs = []
    handle = pairs[0].modules[0].register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()))
    with GradientCapture(pairs, statistics=statistics) as capture:
        for part in (slice(0, 10), slice(10, 32)):
            (model(x[part]) - y[part]).square().mean().backward()
        captured = capture.peek(pairs[0].B)
    handle.remove()
    X = torch.cat(inputs)
    assert captured.num_rows == 32
    if statistics == "diagonal":
        assert ref.rel_err(captured.input_sq_sum, X.square().sum(0)) <= 1e-12
    else:
        assert ref.rel_err(captured.input_gram, X.T @ X) <= 1e-12
    assert A.shape[1] == X.shape[1]


def test_a_grad_scaler_s_scale_is_divided_out():
    model, pairs = tiny_lora_model(seed=16)
    x, y = regression_batch(seed=17)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with GradientCapture(pairs) as plain:
        (model(x) - y).square().mean().backward()
        expected = plain.pop(pairs[0].B).to_dense()
    model.zero_grad()
    with GradientCapture(pairs, grad_scaler=scaler) as scaled:
        scaler.scale((model(x) - y).square().mean()).backward()
        got = scaled.pop(pairs[0].B).to_dense()
    assert ref.rel_err(got, expected) <= 1e-12


def test_removed_hooks_record_nothing_and_leave_no_trace_on_the_modules():
    model, pairs = tiny_lora_model(seed=18)
    x, y = regression_batch(seed=19)
    before = {name: dict(m._forward_hooks) for name, m in model.named_modules()}
    capture = GradientCapture(pairs)
    capture.remove()
    capture.remove()  # idempotent
    (model(x) - y).square().mean().backward()
    assert all(capture.peek(p.B) is None for p in pairs)
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == before


def test_invalid_captures_raise_with_the_offending_values():
    _, pairs = tiny_lora_model(seed=20)
    bare = lorsum.LoRAPair(A=pairs[0].A, B=pairs[0].B, scaling=1.0, name="bare")
    with pytest.raises(ValueError, match=r"LoRA pair 'bare' has no \(down, up\) modules"):
        GradientCapture([bare])
    with pytest.raises(ValueError, match=r"LoRA pair '0' is given twice"):
        GradientCapture([pairs[0], pairs[0]])
    with pytest.raises(ValueError, match=r"Invalid statistics: 'full'"):
        GradientCapture(pairs, statistics="full")
    with pytest.raises(ValueError, match=r"no LoRA pairs given"):
        GradientCapture([])
    with pytest.raises(ValueError, match=r"Invalid fold: 'no'"):
        GradientCapture(pairs, fold="no")
    pairs[0].B.requires_grad_(False)
    with pytest.raises(ValueError, match=r"LoRA pair '0' has a frozen factor"):
        GradientCapture(pairs)
    pairs[0].B.requires_grad_(True)
    with GradientCapture(pairs[:1]) as capture, pytest.raises(KeyError, match="not the B factor"):
        capture.pop(pairs[1].B)


def _autocast_model(seed=30):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    pairs = lorsum.add_lora(model, ["0", "2"], rank=3, dropout=0.2)
    with torch.no_grad():
        for pair in pairs:
            pair.B.normal_(std=0.3)
    return model, pairs


def test_under_autocast_the_rows_are_autograds_own_low_precision_inputs():
    # Autocast casts the adapter's input to bfloat16 and autograd saves that copy for A.grad:
    # the capture takes the same copy (no float32 duplicate kept alive until backward), so the
    # captured gradient is autograd's, and A.grad = Bᵀ G to bfloat16 rounding.
    model, pairs = _autocast_model()
    x = randn(64, 16, seed=31, dtype=torch.float32)
    with GradientCapture(pairs) as capture:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        for pair in pairs:
            captured = capture.peek(pair.B)
            rows = captured.rows or []
            assert all(X.dtype == torch.bfloat16 for _, X in rows)
            G = captured.to_dense()
            assert ref.rel_err(pair.B.T.float() @ G, pair.A.grad) <= 2e-2


def test_under_autocast_checkpointing_gives_the_same_gradient_to_bfloat16_rounding():
    # Checkpointing packs saved tensors through hooks, so the capture keeps the uncast float32
    # input there: the same gradient as without checkpointing, up to the cast's rounding.
    from torch.utils.checkpoint import checkpoint

    def gradients(use_checkpoint):
        model, pairs = _autocast_model(seed=32)
        x = randn(64, 16, seed=33, dtype=torch.float32)
        with GradientCapture(pairs) as capture:
            torch.manual_seed(34)  # the same dropout masks in both runs
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if use_checkpoint:
                    out = checkpoint(model, x, use_reentrant=False, preserve_rng_state=True)
                else:
                    out = model(x)
            out.float().square().mean().backward()
            return [capture.peek(p.B).to_dense().clone() for p in pairs]

    for plain, checkpointed in zip(gradients(False), gradients(True), strict=True):
        assert ref.rel_err(checkpointed, plain) <= 1e-2


@pytest.mark.parametrize(
    ("S_dtype", "X_dtype"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
    ],
)
def test_a_windows_first_fold_is_the_sum_into_zeros_without_the_zeros(S_dtype, X_dtype):
    from lorsum.capture import _accumulate_dtype, _add_product_, _new_product

    S, X = randn(40, 12, seed=1).to(S_dtype), randn(40, 9, seed=2).to(X_dtype)
    into_zeros = torch.zeros(12, 9, dtype=_accumulate_dtype(S))
    _add_product_(into_zeros, S, X)
    first = _new_product(S, X)
    assert first.dtype == into_zeros.dtype
    torch.testing.assert_close(first, into_zeros, rtol=0, atol=0)
