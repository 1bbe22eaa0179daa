"""The step-cost model: the counts the docs state, checked on shapes where they are exact."""

from __future__ import annotations

import pytest
from benchmarks import cost_model


def test_lorsum_sweeps_cost_four_r_n_m_plus_n_on_rows():
    m, n, r, N = 4096, 4096, 16, 2048
    assert cost_model.gradient_is_rows(m, n, N)
    one = cost_model.step_cost("lorsum-x1", m, n, r, N)
    assert one.flops == 4 * N * r * (m + n) + 8 * r * r * (m + n)
    assert one.bytes == 2 * N * (m + n) * 4
    assert cost_model.step_cost("lorsum-x0", m, n, r, N) == one  # the Jacobi pass: one sweep
    assert cost_model.step_cost("lorsum-x3", m, n, r, N) == one * 3
    assert cost_model.step_cost("lorsum-x1-momentum", m, n, r, N) == one * 2


def test_a_folded_gradient_costs_the_dense_products():
    m = n = 256
    r, N = 8, 4096  # N (m + n) > m n: the capture holds G (m, n)
    assert not cost_model.gradient_is_rows(m, n, N)
    sweep = cost_model.step_cost("lorsum-x1", m, n, r, N)
    assert sweep.flops == 4 * r * m * n + 8 * r * r * (m + n)
    assert cost_model.step_cost("lorsum-x1", m, n, r, N, rows=True).flops > sweep.flops


def test_svdlora_is_cubic_and_lorsum_linear_in_the_width():
    def ratio(method):
        small = cost_model.step_cost(method, 1024, 1024, 16, 16, rows=True).flops
        large = cost_model.step_cost(method, 4096, 4096, 16, 16, rows=True).flops
        return large / small

    assert ratio("svdlora") == pytest.approx(4**3, rel=0.1)
    assert ratio("svdlora-gram") == pytest.approx(4**3, rel=0.1)
    assert ratio("lorsum-x1") == pytest.approx(4, rel=0.01)


def test_the_gram_route_models_fewer_operations_than_the_svd():
    # A square m × m decomposition: the SVD's 4m³ + 8m³ + 9m³ against the Gram's 2m³ + 9m³.
    svd = cost_model.step_cost("svdlora", 1024, 1024, 16, 16, rows=True).flops
    gram = cost_model.step_cost("svdlora-gram", 1024, 1024, 16, 16, rows=True).flops
    assert gram / svd == pytest.approx(11 / 21, rel=0.05)


def test_the_floor_is_the_larger_of_the_two_times():
    cost = cost_model.StepCost(flops=2e9, bytes=1e9)
    assert cost.floor_s(flops_per_s=1e12, bytes_per_s=1e11) == pytest.approx(1e-2)  # bytes
    assert cost.floor_s(flops_per_s=1e9, bytes_per_s=1e11) == pytest.approx(2.0)  # flops


@pytest.mark.parametrize("method", ["lorsum-xa", "lorsum-x1-nesterov", "dora"])
def test_unknown_methods_are_named(method):
    with pytest.raises(ValueError, match=method):
        cost_model.step_cost(method, 8, 8, 2, 8)
