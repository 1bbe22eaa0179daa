"""LoLDU: the pivoted LDU factors, the adapter layer, injection, merging, state and errors.

Covers the eight invariants of the spec (related-methods §6.4): the LDU identity and triangular
structure, exact function preservation, only ``z`` trainable, the ``z`` gradient formula, no
residual at full rank, the Schur-complement zeros, merge/removal, and the index permutation
against the dense ``P``. Also: a hand-computed 2×2 case, zero pivots (rank-deficient ``W0``),
no ``m × n`` tensor in the adapter path, dtypes and devices, save/load of the adapter tensors,
the parameter count, a hypothesis property over shapes, a short training run and every error.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lorsum.adapters.loldu import LoLDULinear, add_loldu, load_loldu_state_dict, loldu_state_dict
from lorsum.functional.lu import dense_ldu_product, ldu_matmul, pivoted_ldu
from tests import reference as ref
from tests.utils import generator, randn

F64 = torch.float64


def _linear(m: int, n: int, *, seed: int, dtype: torch.dtype = F64, bias: bool = True):
    """A seeded ``nn.Linear(n, m)`` with Gaussian weights (float64 unless told)."""
    layer = nn.Linear(n, m, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(randn(m, n, seed=seed))
        if bias:
            layer.bias.copy_(randn(m, seed=seed + 1))
    return layer


def _dense_ldu(W: Tensor):
    """The oracle: ``P (m, m)``, ``L (m, k)``, ``d (k,)``, ``Ū (k, n)`` from ``torch.linalg.lu``."""
    P, L, U = torch.linalg.lu(W.double())
    d = U.diagonal()
    return P, L, d, U / d.unsqueeze(1)


# --- 1. the LDU identity and the structure of the factors -------------------------------------


@pytest.mark.parametrize(("m", "n"), [(9, 6), (6, 9), (7, 7)])
def test_ldu_factors_reproduce_W_with_unit_triangular_factors(m, n):
    W = randn(m, n, seed=m * n)
    perm, L, d, U_bar = pivoted_ldu(W)
    k = min(m, n)
    assert perm.dtype == torch.int64
    assert perm.shape == (m,)
    assert L.shape == (m, k)
    assert d.shape == (k,)
    assert U_bar.shape == (k, n)
    assert ref.rel_err(dense_ldu_product(perm, L, d, U_bar), W) <= 1e-14
    # L: unit lower trapezoidal, |L_ij| <= 1 (partial pivoting); Ū: unit upper trapezoidal.
    assert torch.equal(L, torch.tril(L))
    assert torch.equal(L.diagonal(), torch.ones(k, dtype=F64))
    assert float(L.abs().max()) <= 1.0
    assert torch.equal(U_bar, torch.triu(U_bar))
    assert torch.equal(U_bar.diagonal(), torch.ones(k, dtype=F64))
    # The oracle's factors (dense P), read through the index vector.
    _P, L_ref, d_ref, U_ref = _dense_ldu(W)
    assert ref.rel_err(L, L_ref) <= 1e-15
    assert ref.rel_err(d, d_ref) <= 1e-15
    assert ref.rel_err(U_bar, U_ref) <= 1e-15


def test_truncated_factors_are_the_first_elimination_steps():
    W = randn(10, 8, seed=3)
    full = pivoted_ldu(W)
    perm, L, d, U_bar = pivoted_ldu(W, rank=3)
    assert torch.equal(perm, full[0])
    assert torch.equal(L, full[1][:, :3])
    assert torch.equal(d, full[2][:3])
    assert torch.equal(U_bar, full[3][:3])


def test_hand_computed_two_by_two():
    # W = [[1, 2], [3, 4]]: pivoting swaps the rows (|3| > |1|), L = [[1, 0], [1/3, 1]],
    # U = [[3, 4], [0, 2/3]], so d = (3, 2/3) and Ū = [[1, 4/3], [0, 1]]. With r = 1, s = 1:
    # P L_1 d_1 Ū_1 = [[1/3], [1]] · 3 · [1, 4/3] = [[1, 4/3], [3, 4]], W_res = [[0, 2/3], [0, 0]].
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    perm, L, d, U_bar = pivoted_ldu(W)
    assert perm.tolist() == [1, 0]
    torch.testing.assert_close(L, torch.tensor([[1.0, 0.0], [1 / 3, 1.0]], dtype=F64))
    torch.testing.assert_close(d, torch.tensor([3.0, 2 / 3], dtype=F64))
    torch.testing.assert_close(U_bar, torch.tensor([[1.0, 4 / 3], [0.0, 1.0]], dtype=F64))
    base = nn.Linear(2, 2, bias=False, dtype=F64)
    with torch.no_grad():
        base.weight.copy_(W)
    layer = LoLDULinear(base, rank=1, alpha=1.0)
    expected = torch.tensor([[0.0, 2 / 3], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(layer.base.weight, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(layer.z.detach(), torch.tensor([3.0], dtype=F64))


# --- 2. function preservation -----------------------------------------------------------------


@pytest.mark.parametrize("init", ["lu", "ones", "zeros"])
@pytest.mark.parametrize(("alpha", "train_scale"), [(None, False), (1.0, False), (3.0, True)])
def test_init_preserves_the_function_exactly(init, alpha, train_scale):
    base = _linear(12, 10, seed=1)
    W0, reference = base.weight.detach().clone(), copy.deepcopy(base)
    x = randn(7, 10, seed=2)
    layer = LoLDULinear(base, rank=4, alpha=alpha, init=init, train_scale=train_scale)
    y_ref = reference(x)
    assert ref.rel_err(layer(x), y_ref) <= 1e-14, ref.rel_err(layer(x), y_ref)
    assert ref.rel_err(layer.merged_weight(), W0) <= 1e-14
    assert ref.rel_err(layer.original_weight(), W0) <= 1e-14
    expected_z0 = {"lu": pivoted_ldu(W0, rank=4)[2], "ones": 1.0, "zeros": 0.0}[init]
    torch.testing.assert_close(layer.z.detach(), torch.zeros(4, dtype=F64) + expected_z0)


def test_the_wrapped_weight_tensor_is_not_written_to():
    base = _linear(6, 5, seed=4)
    original = base.weight
    before = original.detach().clone()
    layer = LoLDULinear(base, rank=2)
    assert layer.base.weight is not original
    assert torch.equal(original.detach(), before)
    assert not layer.base.weight.requires_grad
    assert not layer.base.bias.requires_grad


# --- 3. only z (and s) is trainable, and the parameter count ----------------------------------


@pytest.mark.parametrize("train_scale", [False, True])
def test_only_z_and_an_enabled_scale_require_grad(train_scale):
    layer = LoLDULinear(_linear(8, 6, seed=5), rank=3, train_scale=train_scale)
    trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
    assert trainable == ({"z", "scaling"} if train_scale else {"z"})
    assert all(not b.requires_grad for b in layer.buffers())


@pytest.mark.parametrize("train_scale", [False, True])
def test_trainable_parameter_count_matches_the_paper_formula(train_scale):
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 6), nn.Linear(6, 3))
    model.requires_grad_(False)
    layers = add_loldu(model, ["0", "2", "3"], rank=3, train_scale=train_scale)
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == sum(layer.trainable_parameter_count() for layer in layers)
    assert counted == 3 * (3 + int(train_scale))  # r per layer, + 1 with a trained scale


# --- 4. the gradient of z ---------------------------------------------------------------------


@pytest.mark.parametrize("train_scale", [False, True])
def test_z_gradient_matches_the_closed_form(train_scale):
    m, n, r = 11, 9, 3
    base = _linear(m, n, seed=6)
    W0 = base.weight.detach().clone()
    layer = LoLDULinear(base, rank=r, alpha=2.0, train_scale=train_scale)  # s = 2/3
    with torch.no_grad():
        layer.z.add_(randn(r, seed=7))  # away from the init, so every term of the form counts
    x, target = randn(6, n, seed=8), randn(6, m, seed=9)
    ((layer(x) - target) ** 2).sum().backward()
    # G = ∂L/∂W of the same loss on a dense layer holding the effective weight.
    W = layer.merged_weight().requires_grad_(True)
    ((x @ W.T + layer.base.bias - target) ** 2).sum().backward()
    G = W.grad
    P, L, _, U_bar = _dense_ldu(W0)
    s = 2.0 / 3.0
    expected = s * torch.diagonal(L[:, :r].T @ P.T @ G @ U_bar[:r].T)  # s·diag(L_rᵀ Pᵀ G Ū_rᵀ)
    assert ref.rel_err(layer.z.grad, expected) <= 1e-12, ref.rel_err(layer.z.grad, expected)
    if train_scale:
        direction = P @ L[:, :r] @ torch.diag(layer.z.detach()) @ U_bar[:r]
        assert ref.rel_err(layer.scaling.grad, (G * direction).sum()) <= 1e-12


# --- 5. and 6. the residual: none at full rank, a Schur complement otherwise -------------------


@pytest.mark.parametrize(("m", "n"), [(8, 5), (5, 8), (6, 6)])
def test_full_rank_with_unit_scale_leaves_no_residual(m, n):
    base = _linear(m, n, seed=10)
    norm = float(base.weight.detach().norm())
    layer = LoLDULinear(base, rank=min(m, n), alpha=float(min(m, n)))  # s = 1
    assert float(layer.base.weight.norm()) <= 1e-14 * norm


@pytest.mark.parametrize(("m", "n", "r"), [(9, 7, 3), (7, 9, 4), (6, 6, 1)])
def test_residual_is_the_schur_complement(m, n, r):
    base = _linear(m, n, seed=11)
    P = _dense_ldu(base.weight.detach())[0]
    layer = LoLDULinear(base, rank=r)  # alpha = rank, s = 1
    PtW = P.T @ layer.base.weight.detach()
    scale = float(PtW.abs().max())
    assert float(PtW[:r].abs().max()) <= 1e-14 * scale
    assert float(PtW[:, :r].abs().max()) <= 1e-14 * scale
    assert float(PtW[r:, r:].abs().max()) > 0.1 * scale  # the Schur complement itself is not 0


# --- 7. merge, unmerge and removal ------------------------------------------------------------


def _train_z(layer_or_model, params, x, target, steps=5, lr=0.05):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        ((layer_or_model(x) - target) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize(("dtype", "bound"), [(F64, 1e-14), (torch.float32, 1e-6)])
def test_merge_and_unmerge_are_exact_after_adamw_steps(dtype, bound):
    base = _linear(12, 10, seed=12).to(dtype)
    W0 = base.weight.detach().double().clone()
    layer = LoLDULinear(base, rank=4, alpha=2.0)
    x, target = randn(16, 10, seed=13).to(dtype), randn(16, 12, seed=14).to(dtype)
    _train_z(layer, [layer.z], x, target)
    assert not torch.equal(layer.z.detach(), layer.z_init)
    W_res = layer.base.weight.detach().clone()
    y = layer(x).detach()
    # Merged weight, literally: W_res + s P L_r diag(z) Ū_r with the dense P of the oracle.
    P, L, _, U_bar = _dense_ldu(W0)
    z = layer.z.detach().double()
    expected = W_res.double() + 0.5 * P @ L[:, :4] @ torch.diag(z) @ U_bar[:4]
    layer.merge()
    assert layer.merged
    assert ref.rel_err(layer.base.weight, expected) <= bound
    assert ref.rel_err(layer(x), y) <= bound
    assert ref.rel_err(layer.delta_weight(), expected - W_res.double()) <= bound
    layer.unmerge()
    assert ref.rel_err(layer.base.weight, W_res) <= bound
    assert ref.rel_err(layer(x), y) <= bound
    # Removal: resetting z brings the effective weight back to W0.
    layer.reset_adapter()
    assert ref.rel_err(layer.merged_weight(), W0) <= bound
    assert ref.rel_err(layer.original_weight(), W0) <= bound


def test_reset_adapter_also_resets_a_trained_scale():
    layer = LoLDULinear(_linear(6, 5, seed=15), rank=2, alpha=1.0, train_scale=True)
    with torch.no_grad():
        layer.scaling.fill_(3.0)
        layer.z.mul_(2.0)
    layer.reset_adapter()
    assert float(layer.scaling.detach()) == 0.5
    assert torch.equal(layer.z.detach(), layer.z_init)


# --- 8. the permutation is an index vector ----------------------------------------------------


@pytest.mark.parametrize(("m", "n"), [(10, 6), (6, 10)])
def test_index_permutation_matches_the_dense_P(m, n):
    base = _linear(m, n, seed=16)
    P = _dense_ldu(base.weight.detach())[0]
    layer = LoLDULinear(base, rank=3)
    assert layer.perm.dtype == torch.int64
    assert layer.perm.shape == (m,)
    assert torch.equal(torch.eye(m, dtype=F64)[layer.perm], P)
    y = randn(m, 4, seed=17)
    assert torch.equal(y[layer.perm], P @ y)
    # Nothing of size m × m (or m × n) is stored besides the residual in base.weight.
    stored = dict(layer.named_buffers()) | dict(layer.named_parameters())
    big = {k for k, t in stored.items() if t.numel() >= min(m * m, m * n) and k != "base.weight"}
    assert not big, big


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views (e.g. the transpose of base.weight) allocate nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_adapter_path_never_allocates_an_m_by_n_tensor():
    m, n, r = 12, 10, 3
    layer = LoLDULinear(_linear(m, n, seed=18), rank=r)
    x = randn(5, n, seed=19)
    with _RecordShapes() as rec:
        ldu_matmul(x, layer.perm, layer.lower, layer.z, layer.upper).sum().backward()
        layer(x).sum().backward()
    dense = [(f, s) for f, s in rec.shapes if s[-2:] in ((m, n), (n, m))]
    assert not dense, dense


# --- zero pivots ------------------------------------------------------------------------------


def _rank_deficient(m: int, n: int, rank: int, *, seed: int) -> Tensor:
    W = randn(m, rank, seed=seed) @ randn(rank, n, seed=seed + 1)
    W[:, 0] = 0.0  # an exactly zero first column: the first pivot is exactly zero
    return W


@pytest.mark.parametrize("W", [_rank_deficient(8, 6, 2, seed=20), torch.zeros(5, 4, dtype=F64)])
def test_zero_pivots_fall_back_to_a_bounded_exact_factorisation(W):
    perm, L, d, U_bar = pivoted_ldu(W)
    assert all(bool(torch.isfinite(t).all()) for t in (L, d, U_bar))
    assert ref.rel_err(dense_ldu_product(perm, L, d, U_bar), W) <= 1e-14 or float(W.norm()) == 0
    assert float((dense_ldu_product(perm, L, d, U_bar) - W).abs().max()) <= 1e-14
    assert torch.equal(U_bar, torch.triu(U_bar))
    pivot_was_small = (d.abs() <= 1e-12) | (U_bar.diagonal() != 1)
    assert bool(pivot_was_small.any())
    # Fallback rows: entries in [-1, 1], never the 1/0 of a plain division.
    assert float(U_bar[pivot_was_small].abs().max()) <= 1.0
    assert bool((U_bar.abs().amax(dim=1) > 0).all())  # every row is a usable direction


def test_rank_deficient_layer_preserves_the_function_and_trains():
    W = _rank_deficient(8, 6, 2, seed=21)
    base = nn.Linear(6, 8, dtype=F64)
    with torch.no_grad():
        base.weight.copy_(W)
    reference = copy.deepcopy(base)
    layer = LoLDULinear(base, rank=4)
    x, target = randn(10, 6, seed=22), randn(10, 8, seed=23)
    assert ref.rel_err(layer(x), reference(x)) <= 1e-14
    _train_z(layer, [layer.z], x, target, steps=3)
    assert bool(torch.isfinite(layer.z).all())
    assert bool(torch.isfinite(layer(x)).all())


# --- dtypes and devices -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_layers_keep_dtype_and_device_and_preserve_the_function(dtype):
    base = _linear(32, 24, seed=24).to(dtype)
    reference = copy.deepcopy(base)
    W0 = base.weight.detach().double()
    layer = LoLDULinear(base, rank=6)
    for t in (layer.z, layer.lower, layer.upper, layer.z_init, layer.base.weight):
        assert t.dtype == dtype
        assert t.device == W0.device
    assert layer.perm.dtype == torch.int64
    x = randn(16, 24, seed=25).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert y.device == x.device
    exact = x.double() @ W0.T + reference.bias.double()
    if dtype == torch.float32:
        assert ref.rel_err(y, exact) <= 1e-5
    else:
        # bf16: W_res and the adapter path are each rounded once more than the plain layer, so
        # allow 4× the error of the unmodified bf16 layer (the trivial baseline).
        baseline = ref.rel_err(reference(x), exact)
        assert ref.rel_err(y, exact) <= 4 * baseline, (ref.rel_err(y, exact), baseline)


def test_pivoted_ldu_factors_low_precision_input_in_float32():
    perm, L, d, U_bar = pivoted_ldu(randn(8, 6, seed=26).bfloat16())
    assert L.dtype == d.dtype == U_bar.dtype == torch.bfloat16
    assert perm.dtype == torch.int64


@pytest.mark.cuda
def test_layer_built_on_cuda_stays_on_cuda():
    layer = LoLDULinear(_linear(8, 6, seed=27).cuda(), rank=2)
    assert all(t.is_cuda for t in (layer.perm, layer.lower, layer.upper, layer.z))
    assert layer(randn(3, 6, seed=28).cuda()).is_cuda


# --- injection, save and load -----------------------------------------------------------------


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)  # nn.Linear's own init; the weights are then replaced below
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    g = generator(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)
    return model


def test_add_loldu_replaces_named_linears_and_freezes_only_them():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 2)).double()
    layers = add_loldu(model, ["2", "0"], rank=3)
    assert [layer.name for layer in layers] == ["2", "0"]
    assert isinstance(model[0], LoLDULinear)
    assert isinstance(model[2], LoLDULinear)
    assert isinstance(model[3], nn.Linear)
    assert model[3].weight.requires_grad
    chosen = add_loldu(model, lambda name, lin: lin.out_features == 2, rank=1)
    assert [layer.name for layer in chosen] == ["3"]


@pytest.mark.parametrize("train_scale", [False, True])
def test_adapter_state_round_trips_into_a_fresh_model(train_scale):
    model = _mlp(seed=30)
    add_loldu(model, ["0", "2"], rank=3, train_scale=train_scale)
    x, target = randn(12, 8, seed=31), randn(12, 4, seed=32)
    params = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1 and p.numel() <= 3]
    _train_z(model, params, x, target)
    state = loldu_state_dict(model)
    expected_keys = {"0.z", "2.z"} | ({"0.scaling", "2.scaling"} if train_scale else set())
    assert set(state) == expected_keys
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    fresh = _mlp(seed=30)
    add_loldu(fresh, ["0", "2"], rank=3, train_scale=train_scale)
    assert not torch.equal(fresh(x), model(x))
    load_loldu_state_dict(fresh, loaded)
    assert torch.equal(fresh(x), model(x))


def test_training_a_two_layer_mlp_reduces_the_loss():
    # The target comes from the same LoLDU family (perturbed z), so 20 AdamW steps can fit it.
    model = _mlp(seed=40)
    model.requires_grad_(False)
    layers = add_loldu(model, ["0", "2"], rank=3)
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            layer.z.add_(0.2 * torch.randn(3, generator=generator(41), dtype=F64))
    x = randn(64, 8, seed=42)
    target = teacher(x).detach()
    opt = torch.optim.AdamW([layer.z for layer in layers], lr=0.02)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.1 * losses[0], losses


def test_extra_repr_names_the_configuration():
    layer = LoLDULinear(_linear(6, 5, seed=43), rank=2, alpha=1.0, init="ones")
    assert "rank=2, scaling=0.5, train_scale=False, init='ones', merged=False" in repr(layer)


# --- property test ----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(data=st.data(), m=st.integers(1, 24), n=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_property_ldu_identity_and_function_preservation(data, m, n, seed):
    r = data.draw(st.integers(1, min(m, n)), label="rank")
    base = _linear(m, n, seed=seed)
    W0, reference = base.weight.detach().clone(), copy.deepcopy(base)
    perm, L, d, U_bar = pivoted_ldu(W0)
    assert ref.rel_err(dense_ldu_product(perm, L, d, U_bar), W0) <= 1e-12
    layer = LoLDULinear(base, rank=r, alpha=1.0)
    x = randn(3, n, seed=seed + 2)
    assert ref.rel_err(layer(x), reference(x)) <= 1e-12
    assert layer.z.shape == (r,)
    assert layer.lower.shape == (m, r)
    assert layer.upper.shape == (r, n)


# --- errors -----------------------------------------------------------------------------------


def _merged_layer():
    layer = LoLDULinear(_linear(6, 5, seed=50), rank=2, name="fc")
    layer.merge()
    return layer


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: LoLDULinear(nn.Conv1d(2, 2, 1), 1), TypeError, r"adapts nn.Linear layers"),
        (lambda: LoLDULinear(_linear(6, 5, seed=0), 0), ValueError, r"Invalid rank: 0"),
        (lambda: LoLDULinear(_linear(6, 5, seed=0), 6), ValueError, r"Invalid rank: 6 .* = 5"),
        (lambda: LoLDULinear(_linear(6, 5, seed=0), True), ValueError, r"Invalid rank: True"),
        (lambda: LoLDULinear(_linear(6, 5, seed=0), 2, alpha=0.0), ValueError, r"alpha: 0.0"),
        (lambda: LoLDULinear(_linear(6, 5, seed=0), 2, init="lora"), ValueError, r"init: 'lora'"),
        (lambda: LoLDULinear(_linear(6, 5, seed=0), 2, rtol=-1.0), ValueError, r"rtol: -1.0"),
        (lambda: _merged_layer().merge(), ValueError, r"Cannot merge: .*'fc' is merged"),
        (
            lambda: LoLDULinear(_linear(6, 5, seed=0), 2, name="fc").unmerge(),
            ValueError,
            r"Cannot unmerge: .*'fc' is not merged",
        ),
        (lambda: _merged_layer().reset_adapter(), ValueError, r"Cannot reset_adapter"),
        (lambda: _merged_layer().original_weight(), ValueError, r"Cannot original_weight"),
        (lambda: pivoted_ldu(randn(4, 3, seed=0), rank=4), ValueError, r"Invalid rank: 4"),
        (lambda: pivoted_ldu(torch.ones(3)), ValueError, r"W must be a matrix \(2-d\)"),
        (lambda: pivoted_ldu(torch.ones(3, 3, dtype=torch.int64)), TypeError, r"floating dtype"),
        (
            lambda: pivoted_ldu(torch.full((3, 3), float("nan"))),
            ValueError,
            r"non-finite entries",
        ),
        (
            lambda: pivoted_ldu(torch.ones(3, 3), compute_dtype=torch.bfloat16),
            ValueError,
            r"Invalid compute_dtype: torch.bfloat16",
        ),
        (lambda: pivoted_ldu(torch.ones(3, 3), rtol=-0.5), ValueError, r"Invalid rtol: -0.5"),
    ],
)
def test_invalid_layer_and_factor_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _model():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def _adapted():
    model = _model()
    add_loldu(model, ["0"], rank=2)
    return model


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: add_loldu(_model(), ["fc9"], 2), ValueError, r"no module named 'fc9'"),
        (lambda: add_loldu(_model(), ["1"], 2), ValueError, r"'1' is a ReLU, not an nn.Linear"),
        (lambda: add_loldu(_model(), lambda n, m: False, 2), ValueError, r"no nn.Linear matched"),
        (lambda: add_loldu(_model(), "0", 2), TypeError, r"got the string '0'"),
        (lambda: add_loldu(_adapted(), ["0.base"], 2), ValueError, r"'0.base' is already adapted"),
        (lambda: add_loldu(_model(), ["0", "2"], 4), ValueError, r"Invalid rank: 4 .* = 3"),
        (lambda: loldu_state_dict(_model()), ValueError, r"no LoLDULinear layers"),
        (
            lambda: load_loldu_state_dict(_adapted(), {}),
            ValueError,
            r"missing keys \['0.z'\], unexpected keys \[\]",
        ),
        (
            lambda: load_loldu_state_dict(
                _adapted(), {"0.z": torch.zeros(2), "2.z": torch.zeros(2)}
            ),
            ValueError,
            r"unexpected keys \['2.z'\]",
        ),
        (
            lambda: load_loldu_state_dict(_adapted(), {"0.z": torch.zeros(3)}),
            ValueError,
            r"'0.z' has shape \(3,\), expected \(2,\)",
        ),
    ],
)
def test_invalid_injection_and_state_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_failed_injection_leaves_the_model_untouched():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"Invalid rank: 4"):
        add_loldu(model, ["0", "2"], 4)  # valid for "0" (5 × 6), too large for "2" (3 × 5)
    assert isinstance(model[0], nn.Linear)
    assert not isinstance(model[0], LoLDULinear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loading_into_a_merged_layer_raises():
    model = _adapted()
    state = loldu_state_dict(model)
    model[0].merge()
    with pytest.raises(ValueError, match=r"layer '0' is merged; unmerge it first"):
        load_loldu_state_dict(model, state)
