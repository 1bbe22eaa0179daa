"""Trained rank pruning against spec ``related-methods.md`` §7.4 (float64 where exact): the energy
rule, the truncation and its subgradient, the projection schedule, the conv view, the final split,
and the LoRSum warm start that replaces the SVD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lorsum.compression import LowRankLinear
from lorsum.compression.trp import TrainedRankPruning, matrix_view, split_layer
from lorsum.functional import energy_rank, energy_truncation, warm_energy_truncation


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    k = min(m, n)
    return (U[:, :k] * 0.7 ** torch.arange(k, dtype=torch.float64)) @ V[:, :k].T


def test_the_energy_rule_picks_the_smallest_rank_that_meets_it():
    squares = torch.tensor([3.0, 2.0, 1.0, 0.5]) ** 2  # 9, 4, 1, 0.25: total 14.25
    assert energy_rank(squares, 9 / 14.25) == 1
    assert energy_rank(squares, 9.01 / 14.25) == 2
    assert energy_rank(squares, 0.99) == 4
    assert energy_rank(squares, 1.0) == 4
    assert energy_rank(torch.zeros(3), 0.5) == 1
    with pytest.raises(ValueError, match="Invalid energy"):
        energy_rank(squares, 0.0)


@given(m=st.integers(2, 12), n=st.integers(2, 12), energy=st.floats(0.05, 1.0))
def test_the_truncation_is_an_idempotent_eckart_young_projection(m, n, energy):
    W = _decaying(m, n, seed=m * 13 + n)
    sigma = torch.linalg.svdvals(W)
    t = energy_truncation(W, energy)
    k = t.rank
    assert k == energy_rank(sigma.square(), energy)
    assert torch.linalg.matrix_rank(t.weight()) == k
    error = float((W - t.weight()).pow(2).sum())
    assert error == pytest.approx(float(sigma[k:].pow(2).sum()), abs=1e-10)
    again = energy_truncation(t.weight(), 1.0)  # projecting T(W) changes nothing
    torch.testing.assert_close(again.weight(), t.weight(), rtol=0, atol=1e-10)
    S = t.subgradient()  # U Vᵀ: a subgradient of the nuclear norm at T(W)
    assert float((S * t.weight()).sum()) == pytest.approx(float(t.S.sum()), abs=1e-10)
    assert float(torch.linalg.matrix_norm(S, ord=2)) == pytest.approx(1.0, abs=1e-10)
    assert float(S.pow(2).sum()) == pytest.approx(k, abs=1e-10)


def test_projection_and_regularisation_run_only_every_period_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    trp = TrainedRankPruning(model, ["0"], energy=0.6, period=3, nuclear_weight=0.5)
    projected = []
    for step in range(7):
        full_rank = int(torch.linalg.matrix_rank(model[0].weight.detach()))
        model[0].weight.grad = torch.zeros_like(model[0].weight)
        did = trp.project_if_due()
        trp.add_nuclear_subgradient()
        grad = model[0].weight.grad
        if did:
            projected.append(step)
            k = trp.ranks()["0"]
            assert int(torch.linalg.matrix_rank(model[0].weight.detach())) == k < full_rank
            assert float(grad.pow(2).sum()) == pytest.approx(0.25 * k, rel=1e-5)
        else:
            assert not grad.any()
        with torch.no_grad():  # an optimizer step that raises the rank again
            model[0].weight.add_(0.05 * torch.randn(6, 8))
    assert projected == [0, 3, 6]


def test_the_channel_wise_conv_view_and_its_split_round_trip():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2).double()
    assert matrix_view(conv.weight).shape == (5, 27)
    torch.testing.assert_close(matrix_view(conv.weight).reshape(conv.weight.shape), conv.weight)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    split, report = split_layer(conv, energy=1.0)
    torch.testing.assert_close(split(x), conv(x), rtol=0, atol=1e-10)
    assert report.rank == 5


def test_the_final_split_reproduces_the_truncated_layer_with_fewer_parameters():
    torch.manual_seed(0)
    linear = nn.Linear(40, 30).double()
    with torch.no_grad():
        linear.weight.copy_(_decaying(30, 40))
    model = nn.Sequential(linear, nn.Tanh())
    truncated = energy_truncation(linear.weight.detach(), 0.95).weight()
    trp = TrainedRankPruning(model, ["0"], energy=0.95)
    x = torch.randn(4, 40, dtype=torch.float64)
    expected = torch.tanh(x @ truncated.T + linear.bias)
    (report,) = trp.finalize()
    assert isinstance(model[0], LowRankLinear)
    assert model[0].rank == report.rank
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-10)
    assert report.rank == energy_rank(torch.linalg.svdvals(linear.weight.detach()).square(), 0.95)
    assert report.parameters_after < report.parameters_before == 40 * 30 + 30
    (by_value,) = TrainedRankPruning(nn.Sequential(nn.Linear(4, 4)), ["0"]).finalize(
        value_threshold=1e9
    )
    assert by_value.rank == 1  # at least one direction is always kept


def test_the_lorsum_warm_start_matches_the_svd_truncation_without_an_svd():
    W = _decaying(60, 50)
    previous = energy_truncation(W, 0.95)
    generator = torch.Generator().manual_seed(1)
    moved = W + 1e-3 * torch.randn(60, 50, generator=generator, dtype=torch.float64)
    exact = energy_truncation(moved, 0.95)
    warm = warm_energy_truncation(moved, previous, 0.95, sweeps=3)
    assert warm is not None
    assert warm.rank == exact.rank
    # Three sweeps from the old factors: the fit's excess error over Eckart–Young is tiny.
    optimum = float((moved - exact.weight()).pow(2).sum())
    excess = float((moved - warm.weight()).pow(2).sum()) / optimum - 1
    assert 0 <= excess < 1e-4
    gap = float((warm.weight() - exact.weight()).norm() / exact.weight().norm())
    assert gap < 1e-3
    # A big move that needs more rank than the previous truncation: no warm answer.
    assert warm_energy_truncation(torch.randn(60, 50, dtype=torch.float64), previous, 0.95) is None


def test_trp_training_with_the_warm_start_ends_where_the_svd_one_does():
    def run(solver):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 4))
        x, y = torch.randn(256, 20), torch.randn(256, 4)
        trp = TrainedRankPruning(model, ["0", "2"], energy=0.9, period=2, solver=solver)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(60):
            trp.project_if_due()
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            trp.add_nuclear_subgradient()
            optimizer.step()
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(x), y)), trp

    svd_loss, svd_trp = run("svd")
    warm_loss, warm_trp = run("lorsum")
    assert warm_trp.warm_calls > 0
    assert warm_trp.svd_calls < svd_trp.svd_calls == 60
    assert warm_loss == pytest.approx(svd_loss, rel=0.02)


def test_bad_input_is_named():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ValueError, match="energy must be in"):
        TrainedRankPruning(model, ["0"], energy=1.5)
    with pytest.raises(ValueError, match="period must be an int >= 1, got 0"):
        TrainedRankPruning(model, ["0"], period=0)
    with pytest.raises(ValueError, match="no module named 'x'"):
        TrainedRankPruning(model, ["x"])
    with pytest.raises(ValueError, match="'1' is a ReLU"):
        TrainedRankPruning(model, ["1"])
    with pytest.raises(ValueError, match="grouped convolution"):
        TrainedRankPruning(model, ["2"])
    with pytest.raises(ValueError, match="solver must be"):
        TrainedRankPruning(model, ["0"], solver="qr")
