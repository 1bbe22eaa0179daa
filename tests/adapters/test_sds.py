"""SDS-LoRA against the invariants of spec ``related-methods.md`` §2.6, in float64: exact
activation, orthonormal frozen bases, gradients ``s G Q_Aᵀ`` / ``s Q_Bᵀ G`` that do not depend on
the factors' scales, sign-aligned refreshes, the rank-2r export, merge/unmerge, the schedule."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lorsum.adapters.sds import (
    SDSLoRALinear,
    SDSLoRASchedule,
    add_sds_lora,
    sds_lora_state_dict,
)
from lorsum.functional import sds_activate, sds_refresh, sds_refresh_due

M, N, R = 12, 9, 3


def _layer(seed: int = 0, *, active: bool = False) -> SDSLoRALinear:
    torch.manual_seed(seed)
    layer = SDSLoRALinear(nn.Linear(N, M, dtype=torch.float64), R)
    with torch.no_grad():  # a trained-looking pair: B = 0 would make the re-split trivial
        layer.lora_B.normal_()
        layer.lora_A.mul_(torch.logspace(0, 2, R, dtype=torch.float64)[:, None])
    if active:
        layer.activate()
    return layer


def _dense_gradient(layer: SDSLoRALinear, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Autograd's gradients of the factors for the loss ⟨G, ΔW⟩ = Σ_k G[:, k]ᵀ ΔW e_k."""
    layer.zero_grad()
    eye = torch.eye(N, dtype=torch.float64)
    out = layer(eye) - layer.base(eye)  # rows: (ΔW e_k)ᵀ
    (out * G.T).sum().backward()
    return layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def test_activation_preserves_the_layer_exactly():
    layer = _layer()
    x = torch.randn(5, N, dtype=torch.float64)
    before, delta = layer(x), layer.delta_weight()
    layer.activate()
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=1e-12)


@given(m=st.integers(2, 9), n=st.integers(2, 9), r=st.integers(1, 4), seed=st.integers(0, 99))
def test_the_re_split_is_exact_and_its_bases_orthonormal(m, n, r, seed):
    r = min(r, m, n)
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=generator, dtype=torch.float64)
    B = torch.randn(m, r, generator=generator, dtype=torch.float64)
    A2, B2, QA, QB = sds_activate(A, B, 0.7)
    torch.testing.assert_close(0.7 * (B2 @ QA + QB @ A2), 0.7 * B @ A, rtol=0, atol=1e-10)
    torch.testing.assert_close(QB.T @ QB, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(QA @ QA.T, torch.eye(r, dtype=torch.float64), atol=1e-12, rtol=0)


def test_a_rank_deficient_pair_still_re_splits_exactly():
    A = torch.randn(R, N, dtype=torch.float64)
    B = torch.zeros(M, R, dtype=torch.float64)
    B[:, 0] = 1.0  # rank 1
    A2, B2, QA, QB = sds_activate(A, B, 1.0)
    torch.testing.assert_close(B2 @ QA + QB @ A2, B @ A, rtol=0, atol=1e-12)
    torch.testing.assert_close(QB.T @ QB, torch.eye(R, dtype=torch.float64), atol=1e-12, rtol=0)


def test_bases_are_frozen_orthonormal_buffers_without_gradients():
    layer = _layer(active=True)
    assert {name for name, _ in layer.named_parameters() if _.requires_grad} == {
        "lora_A",
        "lora_B",
    }
    layer(torch.randn(4, N, dtype=torch.float64)).sum().backward()
    assert not layer.basis_A.requires_grad
    assert layer.basis_A.grad is None
    eye = torch.eye(R, dtype=torch.float64)
    torch.testing.assert_close(layer.basis_B.T @ layer.basis_B, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.basis_A @ layer.basis_A.T, eye, atol=1e-12, rtol=0)


def test_gradients_flow_through_the_bases_only_and_ignore_the_factors_scales():
    layer = _layer(active=True)
    G = torch.randn(M, N, dtype=torch.float64)
    grad_A, grad_B = _dense_gradient(layer, G)
    s = layer.scaling
    torch.testing.assert_close(grad_B, s * G @ layer.basis_A.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_A, s * layer.basis_B.T @ G, rtol=0, atol=1e-12)
    with torch.no_grad():  # rescale both factors by invertible diagonals: nothing changes
        layer.lora_A.mul_(torch.tensor([3.0, 0.1, 7.0], dtype=torch.float64)[:, None])
        layer.lora_B.mul_(torch.tensor([0.2, 5.0, 11.0], dtype=torch.float64))
    again_A, again_B = _dense_gradient(layer, G)
    torch.testing.assert_close(again_A, grad_A, rtol=0, atol=1e-12)
    torch.testing.assert_close(again_B, grad_B, rtol=0, atol=1e-12)

    plain = _layer()  # plain LoRA (before activation): the same rescaling changes the gradients
    lora_A, _ = _dense_gradient(plain, G)
    with torch.no_grad():
        plain.lora_B.mul_(torch.tensor([0.2, 5.0, 11.0], dtype=torch.float64))
    assert not torch.allclose(_dense_gradient(plain, G)[0], lora_A)


def test_a_refresh_right_after_activation_is_a_no_op_and_keeps_signs():
    layer = _layer(active=True)
    old_A, old_B = layer.basis_A.clone(), layer.basis_B.clone()
    assert layer.refresh()
    torch.testing.assert_close(layer.basis_A, old_A, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.basis_B, old_B, rtol=0, atol=1e-10)
    with torch.no_grad():  # move the factors, then refresh: new bases, aligned signs
        layer.lora_A.add_(0.3 * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(0.3 * torch.randn_like(layer.lora_B))
    assert layer.refresh()
    assert bool(((layer.basis_B * old_B).sum(0) >= 0).all())
    assert bool(((layer.basis_A * old_A).sum(1) >= 0).all())
    # The new bases span the factors' column and row spaces.
    projector = layer.basis_B @ layer.basis_B.T
    torch.testing.assert_close(projector @ layer.lora_B, layer.lora_B, rtol=0, atol=1e-10)


def test_a_refresh_is_skipped_when_a_factor_column_or_row_is_tiny():
    layer = _layer(active=True)
    with torch.no_grad():
        layer.lora_B[:, 1] = 1e-3
    old = layer.basis_B.clone()
    assert not layer.refresh(norm_floor=1e-2)
    assert torch.equal(layer.basis_B, old)
    assert sds_refresh(layer.lora_A, layer.lora_B, layer.basis_A, old, norm_floor=1e-5) is not None


def test_the_rank_2r_export_and_merge_reproduce_the_update():
    layer = _layer(active=True)
    A, B = layer.lora_export()
    assert A.shape == (2 * R, N)
    assert B.shape == (M, 2 * R)
    x = torch.randn(6, N, dtype=torch.float64)
    expected = layer(x)
    torch.testing.assert_close(
        layer.base(x) + layer.scaling * x @ A.T @ B.T, expected, rtol=0, atol=1e-12
    )
    weight = layer.base.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, weight, rtol=0, atol=1e-14)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_the_schedule_activates_after_warm_up_clears_state_and_refreshes_on_time():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N, M), nn.Tanh(), nn.Linear(M, 2))
    layers = add_sds_lora(model, ["0", "2"], rank=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    schedule = SDSLoRASchedule(layers, optimizer, total_steps=40, warmup_steps=10)
    x, y = torch.randn(32, N), torch.randn(32, 2)
    losses, refresh_steps = [], []
    for step in range(1, 41):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        before = schedule.refreshes
        with torch.no_grad():
            out_before = model(x)
        schedule.step()
        if step == 10:  # activation: the function is kept and the factors' state is cleared
            assert all(layer.is_active for layer in layers)
            torch.testing.assert_close(model(x), out_before, rtol=0, atol=1e-5)
            assert all(p not in optimizer.state for la in layers for p in (la.lora_A, la.lora_B))
        if schedule.refreshes > before:
            refresh_steps.append(step)
        losses.append(float(loss.detach()))
    expected = [t for t in range(11, 41) if t % (min(t * 5 // 40, 4) + 1) == 0]
    assert refresh_steps == expected
    assert losses[-1] < 0.7 * losses[0]


def test_the_refresh_rule_follows_the_reference_phases():
    due = [t for t in range(1, 101) if sds_refresh_due(t, 100, warmup_steps=10, phases=5)]
    assert due[:3] == [11, 12, 13]  # phase 0: every step
    assert [t for t in due if 20 <= t < 40] == list(range(20, 40, 2))  # phase 1: every 2nd
    assert [t for t in due if t >= 80] == [80, 85, 90, 95, 100]  # phase 4: every 5th
    with pytest.raises(ValueError, match="total_steps ≥ 1"):
        sds_refresh_due(3, 0)


def test_adapter_state_saves_and_loads_into_a_fresh_model():
    def build(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(N, M), nn.Tanh(), nn.Linear(M, 2))
        return model, add_sds_lora(model, ["0"], rank=2)

    model, layers = build(0)
    with torch.no_grad():
        layers[0].lora_B.normal_()
    layers[0].activate()
    state = sds_lora_state_dict(model)
    assert set(state) == {f"0.{k}" for k in ("lora_A", "lora_B", "basis_A", "basis_B", "active")}
    fresh, fresh_layers = build(0)
    fresh.load_state_dict(state, strict=False)
    x = torch.randn(3, N)
    assert fresh_layers[0].is_active
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="Invalid rank: 10"):
        SDSLoRALinear(nn.Linear(N, M), 10)
    with pytest.raises(TypeError, match=r"adapts nn\.Linear layers, got Conv1d"):
        SDSLoRALinear(nn.Conv1d(2, 2, 1), 1)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        add_sds_lora(nn.Sequential(nn.Linear(2, 2)), ["nope"], 1)
    with pytest.raises(RuntimeError, match="call activate"):
        _layer().refresh()
    with pytest.raises(ValueError, match="at least one SDSLoRALinear"):
        SDSLoRASchedule([], None, total_steps=5)
    with pytest.raises(ValueError, match="rank 4 exceeds min"):
        sds_activate(torch.randn(4, 3), torch.randn(5, 4), 1.0)
