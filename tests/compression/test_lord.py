"""LoRD: factors, rank rules, solvers, ``LowRankLinear`` and ``compress_model``.

Covers the six invariants of ``shared/spec/related-methods.md`` §8.3 (full rank is exact, the SVD
error is the spectral tail, the feature variant beats SVD on calibration outputs, the projector
is idempotent and the rank bounded, a non-compressing rank is refused, dtype/device/gradients are
kept), hand-computed 2×2 cases, the energy rank rule, the randomized and LoRSum solvers against
the exact SVD / eigh, the statistics collected by hooks, every error we raise, and a tiny Llama
model compressed on its MLP projections.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lorsum.compression.lord import (
    LowRankLinear,
    collect_output_statistics,
    compress_model,
    lord_factors,
    lord_rank,
)
from lorsum.functional.feature import OutputStatistics, energy_rank, feature_basis
from tests import reference as ref
from tests.utils import generator, orthonormal, randn

# ---------------------------------------------------------------------------------------------
# Builders


def decaying_matrix(m: int, n: int, decay: float, *, seed: int) -> torch.Tensor:
    """``U diag(decay^i) Vᵀ`` in float64 with random orthonormal ``U``, ``V``."""
    k = min(m, n)
    sv = decay ** torch.arange(k, dtype=torch.float64)
    return (orthonormal(m, k, seed=seed) * sv) @ orthonormal(n, k, seed=seed + 1).T


def anisotropic_inputs(tokens: int, n: int, *, seed: int) -> torch.Tensor:
    """``X (tokens, n)`` whose covariance has eigenvalues spread over six decades, plus a mean."""
    scales = torch.logspace(1, -2, n, dtype=torch.float64)
    Z = randn(tokens, n, seed=seed) * scales
    return Z @ orthonormal(n, n, seed=seed + 1).T + 0.5 * randn(n, seed=seed + 2)


def calibration_problem(m: int = 10, n: int = 12, tokens: int = 200, *, seed: int = 0):
    """Weight, bias, inputs, outputs and their statistics of one layer, float64."""
    W, b = randn(m, n, seed=seed), randn(m, seed=seed + 10)
    X = anisotropic_inputs(tokens, n, seed=seed + 20)
    Y = X @ W.T + b
    return W, b, X, Y, OutputStatistics.from_outputs(Y)


def mean_square_error(X, Y, down, up, bias) -> float:
    """``E‖y − y'‖²`` of the compressed layer on the calibration tokens, formed densely."""
    return float((Y - (X @ down.T @ up.T + bias)).square().sum(-1).mean())


def oracle_tail(W: torch.Tensor, rank: int) -> float:
    return float(torch.linalg.svdvals(W.double())[rank:].square().sum())


# ---------------------------------------------------------------------------------------------
# Hand-computed cases (2×2, r = 1)


def test_svd_of_a_diagonal_weight_keeps_its_largest_entry():
    W = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    down, up, bias = lord_factors(W, 1)
    assert bias is None
    torch.testing.assert_close(up @ down, torch.tensor([[3.0, 0.0], [0.0, 0.0]]).double())
    # Balanced split: both factors carry √3.
    torch.testing.assert_close(up.abs().max(), torch.tensor(3.0).sqrt().double())
    torch.testing.assert_close(down.abs().max(), torch.tensor(3.0).sqrt().double())


def test_feature_keeps_the_output_direction_the_data_excites_even_if_its_weight_is_smaller():
    W = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    X = torch.tensor([[0.1, 0.0], [0.0, 10.0]], dtype=torch.float64)
    stats = OutputStatistics.from_outputs(X @ W.T)  # C = diag(0.045, 50)
    down, up, _ = lord_factors(W, 1, method="feature", outputs=stats)
    torch.testing.assert_close(up @ down, torch.tensor([[0.0, 0.0], [0.0, 1.0]]).double())


# ---------------------------------------------------------------------------------------------
# §8.3 invariant 1: full rank reproduces the layer


@pytest.mark.parametrize("method", ["svd", "feature"])
@pytest.mark.parametrize("solver", ["exact", "randomized", "lorsum"])
@pytest.mark.parametrize(("m", "n"), [(10, 12), (12, 7)])
def test_full_rank_reproduces_the_layer(method, solver, m, n):
    W, b, X, Y, stats = calibration_problem(m, n, seed=1)
    outputs = stats if method == "feature" else None
    down, up, _ = lord_factors(
        W, min(m, n), method=method, bias=b, outputs=outputs, solver=solver, generator=generator(0)
    )
    layer = LowRankLinear.from_factors(down, up, b)
    with torch.no_grad():
        assert ref.rel_err(layer(X), Y) <= 1e-10
    assert ref.rel_err(layer.merged_weight(), W) <= 1e-10


# ---------------------------------------------------------------------------------------------
# §8.3 invariant 2: the SVD variant's squared error is the tail Σ_{i>r} σ_i²


@settings(max_examples=30)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    rank_seed=st.integers(0, 10**6),
    seed=st.integers(0, 10**4),
)
def test_svd_squared_error_is_the_spectral_tail(m, n, rank_seed, seed):
    rank = 1 + rank_seed % min(m, n)
    W = randn(m, n, seed=seed)
    down, up, _ = lord_factors(W, rank)
    error = float((W - up @ down).square().sum())
    tail = oracle_tail(W, rank)
    # Eckart–Young in float64: only rounding separates the two (relative to ‖W‖², not the tail).
    assert abs(error - tail) <= 1e-12 * float(W.square().sum()), (m, n, rank, error, tail)


def test_randomized_and_lorsum_solvers_are_within_a_stated_tolerance_of_the_exact_svd():
    """Measured (256 × 192, σ_i = 0.9^i, r = 16, float64): excess relative error about 4e-6 for
    the randomized range finder (10 oversamples, 2 power iterations) and 4e-9 for LoRSum
    (4 sweeps of rank 26, 10 oversamples). The bound 1e-4 leaves an order of magnitude."""
    W, rank = decaying_matrix(256, 192, 0.9, seed=3), 16
    exact = oracle_tail(W, rank) ** 0.5
    for solver in ("exact", "randomized", "lorsum"):
        down, up, _ = lord_factors(W, rank, solver=solver, generator=generator(0))
        excess = (float((W - up @ down).norm()) - exact) / exact
        assert -1e-12 <= excess <= 1e-4, f"{solver}: excess relative error {excess:.3e}"


def test_feature_solvers_reach_the_eigen_tail_within_the_same_tolerance():
    m, rank = 96, 12
    C_eigvals = 0.8 ** torch.arange(m, dtype=torch.float64)
    L = orthonormal(m, m, seed=4) * C_eigvals.sqrt()  # C = L Lᵀ
    Y = randn(4 * m, m, seed=5) @ L.T
    stats = OutputStatistics.from_outputs(Y)
    W = randn(m, 128, seed=6)  # m <= n: the eigenbasis is sought in the whole output space
    C = stats.second_moment
    best = float(torch.linalg.eigvalsh(C)[: m - rank].sum())  # Σ_{i>r} λ_i
    for solver in ("exact", "randomized", "lorsum"):
        _, up, _ = lord_factors(
            W, rank, method="feature", outputs=stats, solver=solver, generator=generator(0)
        )
        error = float(torch.trace(C) - torch.trace(up.T @ C @ up))  # E‖(I − QQᵀ)y‖²
        excess = (error - best) / best
        assert -1e-10 <= excess <= 1e-4, f"{solver}: excess output error {excess:.3e}"


def test_randomized_solvers_are_deterministic_for_a_seeded_generator():
    W = randn(40, 30, seed=7)
    for solver in ("randomized", "lorsum"):
        first = lord_factors(W, 5, solver=solver, generator=generator(1))
        second = lord_factors(W, 5, solver=solver, generator=generator(1))
        assert torch.equal(first.down, second.down)
        assert torch.equal(first.up, second.up)


# ---------------------------------------------------------------------------------------------
# §8.3 invariant 3: the feature variant is never worse than SVD on calibration outputs


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_feature_output_error_is_at_most_the_svd_error_on_calibration_data(seed, rank):
    W, b, X, Y, stats = calibration_problem(seed=seed)
    down, up, _ = lord_factors(W, rank)
    svd_error = mean_square_error(X, Y, down, up, b)
    down, up, _ = lord_factors(W, rank, method="feature", bias=b, outputs=stats)
    feature_error = mean_square_error(X, Y, down, up, b)
    down, up, new_bias = lord_factors(W, rank, method="feature", bias=b, outputs=stats, center=True)
    centred_error = mean_square_error(X, Y, down, up, new_bias)
    # Both are minimisers over rank-r projections (Ky Fan); centring can only help further.
    assert feature_error <= svd_error * (1 + 1e-12), (feature_error, svd_error)
    assert centred_error <= feature_error * (1 + 1e-12), (centred_error, feature_error)
    # With inputs this anisotropic the data-aware fit is much better, not merely no worse.
    assert feature_error <= 0.9 * svd_error, (feature_error, svd_error)  # measured 0.004–0.77


@settings(max_examples=25)
@given(
    m=st.integers(1, 16),
    n=st.integers(1, 16),
    rank_seed=st.integers(0, 10**6),
    seed=st.integers(0, 10**4),
)
def test_feature_never_loses_to_svd_on_calibration_outputs_for_any_shape(m, n, rank_seed, seed):
    rank = 1 + rank_seed % min(m, n)
    W, b = randn(m, n, seed=seed), randn(m, seed=seed + 1)
    X = anisotropic_inputs(40, n, seed=seed + 2)
    Y = X @ W.T + b
    stats = OutputStatistics.from_outputs(Y)
    down, up, _ = lord_factors(W, rank)
    svd_error = mean_square_error(X, Y, down, up, b)
    for center in (False, True):
        down, up, new_bias = lord_factors(
            W, rank, method="feature", bias=b, outputs=stats, center=center
        )
        error = mean_square_error(X, Y, down, up, b if new_bias is None else new_bias)
        # Slack: rounding of eigh and of the float64 moments, relative to the signal E‖Wx‖².
        slack = 1e-10 * float(stats.covariance(center=False, offset=b).trace())
        assert error <= svd_error + slack, (m, n, rank, center, error, svd_error)


def test_feature_output_error_is_the_eigen_tail_of_the_output_covariance():
    W, b, X, Y, stats = calibration_problem(seed=3)
    rank = 4
    for center in (False, True):
        down, up, new_bias = lord_factors(
            W, rank, method="feature", bias=b, outputs=stats, center=center
        )
        C = stats.covariance(center=center, offset=None if center else b)
        tail = float(torch.linalg.eigvalsh(C)[: C.shape[0] - rank].sum())
        error = mean_square_error(X, Y, down, up, b if new_bias is None else new_bias)
        assert abs(error - tail) <= 1e-10 * float(torch.trace(C)), (center, error, tail)


def test_centred_bias_is_the_projected_bias_plus_the_rejected_mean():
    W, b, _, Y, stats = calibration_problem(seed=4)
    _, up, new_bias = lord_factors(W, 3, method="feature", bias=b, outputs=stats, center=True)
    P = up @ up.T
    expected = P @ b + (torch.eye(10, dtype=torch.float64) - P) @ Y.mean(0)
    assert ref.rel_err(new_bias, expected) <= 1e-12


# ---------------------------------------------------------------------------------------------
# §8.3 invariant 4: Q_r Q_rᵀ is idempotent and rank(up @ down) <= r


@pytest.mark.parametrize("method", ["svd", "feature"])
@pytest.mark.parametrize("solver", ["exact", "randomized", "lorsum"])
def test_projector_is_idempotent_and_the_product_has_rank_at_most_r(method, solver):
    W, b, _, _, stats = calibration_problem(seed=5)
    outputs = stats if method == "feature" else None
    rank = 3
    down, up, _ = lord_factors(
        W, rank, method=method, bias=b, outputs=outputs, solver=solver, generator=generator(0)
    )
    assert down.shape == (rank, 12)
    assert up.shape == (10, rank)
    assert int(torch.linalg.matrix_rank(up @ down)) <= rank
    Q = up if method == "feature" else torch.linalg.qr(up).Q
    P = Q @ Q.T
    assert ref.rel_err(P @ P, P) <= 1e-12
    # Both variants are left projections of W: up @ down = P W.
    assert ref.rel_err(up @ down, P @ W) <= 1e-10


def test_feature_basis_orders_eigenvectors_and_clamps_the_spectrum():
    C = torch.diag(torch.tensor([1.0, 5.0, -1e-18, 3.0], dtype=torch.float64))
    Q, eigvals = feature_basis(C, 2)
    torch.testing.assert_close(eigvals, torch.tensor([5.0, 3.0, 1.0, 0.0]).double())
    torch.testing.assert_close(Q.abs(), torch.eye(4, dtype=torch.float64)[:, [1, 3]])


# ---------------------------------------------------------------------------------------------
# §8.3 invariant 5: a rank that does not compress is refused


def test_ranks_at_the_compression_threshold():
    # 64×32: mn/(m+n) = 21.33, so rank 21 compresses and rank 22 does not.
    model = nn.Sequential(nn.Linear(32, 64))
    report = compress_model(model, ["0"], rank=21)
    assert report.layers[0].params_after == 21 * 96 + 64 < report.layers[0].params_before
    with pytest.raises(ValueError, match=r"rank 22 \(rank\) does not compress layer '0' \(64x32\)"):
        compress_model(nn.Sequential(nn.Linear(32, 64)), ["0"], rank=22)
    # 8×8: mn/(m+n) = 4 exactly; equal parameter counts are refused too.
    with pytest.raises(ValueError, match=r"rank < mn/\(m\+n\) = 4\.00"):
        compress_model(nn.Sequential(nn.Linear(8, 8)), ["0"], rank=4)


def test_rank_fraction_rounds_to_the_nearest_rank_of_min_m_n():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    report = compress_model(model, ["0", "2"], rank_fraction=0.3)
    assert [c.rank for c in report.layers] == [10, 3]  # round(9.6), round(3.0)


def test_centring_a_layer_without_bias_gives_the_new_layer_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10, bias=False)).double()
    X = anisotropic_inputs(100, 12, seed=14)
    report = compress_model(model, ["0"], rank=3, method="feature", calibration=[X], center=True)
    assert model[0].up.bias is not None
    assert report.layers[0].params_after == 3 * 22 + 10


def test_non_compressing_rank_is_kept_when_asked():
    model = nn.Sequential(nn.Linear(8, 8))
    report = compress_model(model, ["0"], rank=8, require_compression=False)
    assert report.layers[0].params_after == 8 * 16 + 8 > report.layers[0].params_before


# ---------------------------------------------------------------------------------------------
# §8.3 invariant 6: dtype and device are kept, both factors get gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", ["svd", "feature"])
def test_new_layers_keep_dtype_and_device_and_both_factors_train(dtype, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 6)).to(dtype)
    x = torch.randn(16, 24, generator=generator(1)).to(dtype)
    calibration = [x] if method == "feature" else None
    compress_model(model, ["0"], rank=4, method=method, calibration=calibration)
    layer = model[0]
    assert isinstance(layer, LowRankLinear)
    for p in layer.parameters():
        assert p.dtype == dtype
        assert p.device == x.device
        assert p.requires_grad
    model(x).square().sum().backward()
    for p in (layer.down.weight, layer.up.weight, layer.up.bias):
        assert p.grad is not None
        assert bool(torch.isfinite(p.grad).all())
        assert p.grad.abs().sum() > 0


@pytest.mark.cuda
def test_new_layers_stay_on_the_gpu():
    model = nn.Sequential(nn.Linear(24, 32)).cuda()
    x = torch.randn(16, 24, device="cuda")
    compress_model(model, ["0"], rank=4, method="feature", calibration=[x], solver="randomized")
    assert all(p.device == x.device for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Rank from energy


@pytest.mark.parametrize(
    ("energy", "rank"), [(0.4, 1), (0.41, 2), (0.7, 2), (0.71, 3), (0.9, 3), (0.91, 4), (1.0, 4)]
)
def test_energy_rank_keeps_the_smallest_prefix_holding_the_fraction(energy, rank):
    assert energy_rank(torch.tensor([3.0, 1.0, 4.0, 2.0], dtype=torch.float64), energy) == rank


def test_energy_rank_ignores_zero_and_rounding_noise_tails():
    assert energy_rank(torch.tensor([1.0, 0.0, 0.0]), 1.0) == 1
    assert energy_rank(torch.tensor([2.0, 1.0, 1e-20, -1e-18], dtype=torch.float64), 1.0) == 2
    assert energy_rank(torch.zeros(3), 0.5) == 1


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_lord_rank_keeps_the_energy_of_the_singular_values_or_the_covariance_trace(energy):
    W, b, _, _, stats = calibration_problem(seed=6)
    sq = torch.linalg.svdvals(W).square()
    r = lord_rank(W, energy)
    assert sq[:r].sum() >= energy * sq.sum() * (1 - 1e-12)
    assert r == 1 or sq[: r - 1].sum() < energy * sq.sum()
    C = stats.covariance(center=False, offset=b)
    ev = torch.linalg.eigvalsh(C).flip(0)
    r = lord_rank(W, energy, method="feature", bias=b, outputs=stats)
    assert ev[:r].sum() >= energy * torch.trace(C) * (1 - 1e-12)
    assert r == 1 or ev[: r - 1].sum() < energy * torch.trace(C)


def test_energy_rank_of_a_tall_feature_layer_is_at_most_n():
    # m = 12 outputs of a rank-5 weight: only 5 output directions carry energy.
    W, b, _, _, stats = calibration_problem(12, 5, seed=7)
    assert lord_rank(W, 1.0, method="feature", bias=b, outputs=stats) == 5


# ---------------------------------------------------------------------------------------------
# Statistics and reports


def test_hooks_collect_the_moments_of_every_target_and_are_removed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    batches = [randn(3, 7, 6, seed=i) for i in range(3)]
    stats = collect_output_statistics(model, ["0", "2"], batches)
    assert list(stats) == ["0", "2"]
    with torch.no_grad():
        Y0 = torch.cat([model[0](x).reshape(-1, 5) for x in batches])
        Y2 = torch.cat([model(x).reshape(-1, 4) for x in batches])
    for name, Y in (("0", Y0), ("2", Y2)):
        expected = OutputStatistics.from_outputs(Y)
        assert stats[name].count == 63
        torch.testing.assert_close(stats[name].second_moment, expected.second_moment)
        torch.testing.assert_close(stats[name].mean, expected.mean)
    assert not model[0]._forward_hooks
    assert not model[2]._forward_hooks
    # A callable calibration and dict batches give the same statistics.
    again = collect_output_statistics(model, ["0"], lambda net: [net(x) for x in batches])
    torch.testing.assert_close(again["0"].second_moment, stats["0"].second_moment)


def test_covariance_matches_the_population_covariance_and_the_offset_formula():
    Y = randn(50, 4, seed=8) + 3.0
    stats = OutputStatistics.from_outputs(Y)
    torch.testing.assert_close(stats.covariance(center=True), torch.cov(Y.T, correction=0))
    c = randn(4, seed=9)
    torch.testing.assert_close(stats.covariance(center=False, offset=c), (Y - c).T @ (Y - c) / 50)


@pytest.mark.parametrize(
    ("method", "center"), [("svd", False), ("feature", False), ("feature", True)]
)
def test_report_errors_match_the_dense_oracle(method, center):
    W, b, X, Y, _ = calibration_problem(seed=10)
    model = nn.Sequential(nn.Linear(12, 10)).double()
    with torch.no_grad():
        model[0].weight.copy_(W)
        model[0].bias.copy_(b)
    report = compress_model(model, ["0"], rank=3, method=method, calibration=[X], center=center)
    (entry,) = report.layers
    layer = model[0]
    assert ref.rel_err(layer.merged_weight(), W) == pytest.approx(entry.weight_error, rel=1e-10)
    with torch.no_grad():
        expected = ((Y - layer(X)).square().sum(-1).mean() / Y.square().sum(-1).mean()).sqrt()
    assert entry.output_error == pytest.approx(float(expected), rel=1e-9)
    assert entry.shape == (10, 12)
    assert entry.rank == 3
    assert entry.params_before == 130
    assert entry.params_after == 3 * 22 + 10
    assert "params 130 -> 76" in str(report)


def test_a_failing_layer_leaves_the_whole_model_untouched():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with pytest.raises(ValueError, match=r"rank 4 \(rank\) does not compress layer '2' \(4x64\)"):
        compress_model(model, ["0", "2"], rank=4)
    assert isinstance(model[0], nn.Linear)
    assert isinstance(model[2], nn.Linear)


def test_targets_match_whole_name_segments_and_predicates_work():
    model = nn.Module()
    model.block = nn.Module()
    model.block.up_proj = nn.Linear(16, 16)
    model.block.xup_proj = nn.Linear(16, 16)
    report = compress_model(model, ["up_proj"], rank=2)
    assert [c.name for c in report.layers] == ["block.up_proj"]
    assert isinstance(model.block.xup_proj, nn.Linear)
    report = compress_model(model, lambda name, linear: name.endswith("xup_proj"), rank=2)
    assert [c.name for c in report.layers] == ["block.xup_proj"]


def test_from_factors_copies_and_the_layer_counts_r_times_m_plus_n():
    down, up, bias = randn(3, 7, seed=11), randn(5, 3, seed=12), randn(5, seed=13)
    layer = LowRankLinear.from_factors(down, up, bias)
    down.zero_()
    assert layer.down.weight.abs().sum() > 0
    assert sum(p.numel() for p in layer.parameters()) == 3 * (5 + 7) + 5
    assert (layer.in_features, layer.out_features, layer.rank) == (7, 5, 3)
    assert "rank=3" in repr(layer)


# ---------------------------------------------------------------------------------------------
# A tiny transformers model, compressed on its MLP projections


MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).double().eval()
    # Give the MLP weights the decaying spectrum of trained ones (random init is nearly flat).
    with torch.no_grad():
        for i, (name, module) in enumerate(model.named_modules()):
            if name.rpartition(".")[2] in MLP:
                m, n = module.weight.shape
                module.weight.copy_(decaying_matrix(m, n, 0.6, seed=100 + i) * 0.05 * min(m, n))
    return model


def llama_batches(count: int = 2, *, seed: int = 0):
    g = generator(seed)
    return [torch.randint(0, 50, (2, 16), generator=g) for _ in range(count)]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", ["svd", "feature"])
def test_llama_mlp_compression_changes_logits_little_at_high_energy(method):
    model = tiny_llama()
    ids = llama_batches(1, seed=1)[0]
    before = logits(model, ids)
    params_before = sum(p.numel() for p in model.parameters())
    calibration = [{"input_ids": x} for x in llama_batches()] if method == "feature" else None
    report = compress_model(model, MLP, energy=0.999, method=method, calibration=calibration)
    assert len(report.layers) == 6
    assert all(isinstance(model.get_submodule(c.name), LowRankLinear) for c in report.layers)
    assert all(c.rank < 64 * 32 / 96 for c in report.layers)
    params_after = sum(p.numel() for p in model.parameters())
    assert params_after == params_before - report.params_before + report.params_after
    assert params_after < params_before
    # Measured: 2.7e-2 (svd, ranks 7) and 2.8e-2 (feature, ranks 6-7); 0.1 % of the energy is
    # dropped in each of six layers, a relative weight error of about 3 % per layer.
    change = ref.rel_err(logits(model, ids), before)
    assert change <= 0.05, f"{method}: relative logit change {change:.3e}"


@pytest.mark.parametrize("method", ["svd", "feature"])
def test_llama_mlp_compression_at_full_rank_changes_nothing(method):
    model = tiny_llama()
    ids = llama_batches(1, seed=1)[0]
    before = logits(model, ids)
    with torch.no_grad():
        hidden_before = model(ids, output_hidden_states=True).hidden_states
    calibration = llama_batches() if method == "feature" else None
    report = compress_model(
        model,
        MLP,
        rank_fraction=1.0,
        method=method,
        calibration=calibration,
        require_compression=False,
    )
    assert {c.rank for c in report.layers} == {32}
    assert max(c.weight_error for c in report.layers) <= 1e-12
    # The first decoder layer's output is float64 end to end: only rounding may differ.
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    assert ref.rel_err(hidden[1], hidden_before[1]) <= 1e-12
    # LlamaRMSNorm normalises in float32 even in a float64 model, so later activations and the
    # logits carry float32 rounding: a 1e-15 change upstream can flip one float32 ulp (≈ 6e-8).
    assert ref.rel_err(hidden[-1], hidden_before[-1]) <= 1e-6
    assert ref.rel_err(logits(model, ids), before) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Errors


def _linear_model():
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": ["nope"], "rank": 2}, ValueError, r"has no module named 'nope'"),
        ({"targets": ["1"], "rank": 2}, ValueError, r"'1' \(target '1'\) is a ReLU, not an nn"),
        ({"targets": "0", "rank": 2}, TypeError, r"targets must be a list of names"),
        ({"targets": lambda n, m: False, "rank": 2}, ValueError, r"no nn.Linear matched"),
        (
            {"targets": ["0"], "energy": 0.0},
            ValueError,
            r"Invalid energy: 0.0 \(must be in \(0, 1\]\)",
        ),
        ({"targets": ["0"], "energy": 1.5}, ValueError, r"Invalid energy: 1.5"),
        ({"targets": ["0"], "rank_fraction": 2}, ValueError, r"Invalid rank_fraction: 2"),
        ({"targets": ["0"], "rank": 0}, ValueError, r"Invalid rank: 0"),
        ({"targets": ["0"]}, ValueError, r"exactly one of rank, rank_fraction or energy, got none"),
        (
            {"targets": ["0"], "rank": 2, "energy": 0.9},
            ValueError,
            r"exactly one of .* got \['rank', 'energy'\]",
        ),
        ({"targets": ["0"], "rank": 20}, ValueError, r"rank 20 \(rank\) exceeds min\(m, n\) = 16"),
        ({"targets": ["0"], "rank": 2, "method": "pca"}, ValueError, r"Invalid method: 'pca'"),
        ({"targets": ["0"], "rank": 2, "solver": "qr"}, ValueError, r"Invalid solver: 'qr'"),
        (
            {"targets": ["0"], "rank": 2, "method": "feature"},
            ValueError,
            r"method='feature' needs calibration data",
        ),
        ({"targets": ["0"], "rank": 2, "center": True}, ValueError, r"center=True needs method"),
        (
            {"targets": ["0"], "rank": 2, "method": "feature", "calibration": torch.ones(2, 16)},
            TypeError,
            r"got a single Tensor; wrap one batch in a list",
        ),
        (
            {"targets": ["0"], "rank": 2, "method": "feature", "calibration": []},
            ValueError,
            r"never ran layer '0' \(0 tokens seen\)",
        ),
    ],
)
def test_compress_model_errors_name_the_offending_values(kwargs, error, match):
    model = _linear_model()
    with pytest.raises(error, match=match):
        compress_model(model, **kwargs)
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: lord_factors(randn(6, 4, seed=0), 5), ValueError, r"Invalid rank: 5 for a 6x4"),
        (
            lambda: lord_factors(randn(6, 4, seed=0), 2, method="feature"),
            ValueError,
            r"needs outputs",
        ),
        (
            lambda: lord_factors(
                randn(6, 4, seed=0), 2, outputs=OutputStatistics.from_outputs(randn(3, 6, seed=1))
            ),
            ValueError,
            r"outputs are only used by method='feature'",
        ),
        (
            lambda: lord_factors(
                randn(6, 4, seed=0),
                2,
                method="feature",
                outputs=OutputStatistics.from_outputs(randn(3, 5, seed=1)),
            ),
            ValueError,
            r"outputs describe 5 features but the weight has m = 6 rows",
        ),
        (
            lambda: lord_factors(randn(6, 4, seed=0), 2, method="feature", outputs=torch.eye(6)),
            TypeError,
            r"outputs must be an OutputStatistics, got Tensor",
        ),
        (
            lambda: lord_factors(randn(6, 4, seed=0), 2, bias=torch.ones(4)),
            ValueError,
            r"bias must be a tensor of shape \(6,\), got \(4,\)",
        ),
        (lambda: lord_factors(torch.ones(3), 1), ValueError, r"weight must be a matrix"),
        (lambda: lord_rank(randn(6, 4, seed=0), 0), ValueError, r"Invalid energy: 0"),
        (lambda: energy_rank(torch.ones(3), float("nan")), ValueError, r"Invalid energy: nan"),
        (lambda: energy_rank(torch.ones(2, 2), 0.5), ValueError, r"non-empty 1-d tensor"),
        (lambda: feature_basis(torch.eye(3), 4), ValueError, r"Invalid rank: 4 .* <= 3"),
        (
            lambda: OutputStatistics(torch.eye(3), torch.zeros(3), 0),
            ValueError,
            r"Invalid count: 0",
        ),
        (
            lambda: OutputStatistics(torch.eye(3), torch.zeros(2), 1),
            ValueError,
            r"mean must be a tensor of shape \(3,\), got \(2,\)",
        ),
        (
            lambda: LowRankLinear.from_factors(randn(3, 7, seed=0), randn(5, 2, seed=1)),
            ValueError,
            r"disagree on the rank",
        ),
        (
            lambda: LowRankLinear.from_factors(randn(3, 7, seed=0), randn(5, 3, seed=1).float()),
            ValueError,
            r"share one dtype and device",
        ),
        (lambda: LowRankLinear(4, 4, 0), ValueError, r"Invalid rank: 0"),
    ],
)
def test_functional_errors_name_the_offending_values(call, error, match):
    with pytest.raises(error, match=match):
        call()
