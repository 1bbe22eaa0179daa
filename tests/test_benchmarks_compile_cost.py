"""The torch.compile suite: each method measured eager and compiled, and its summary."""

from __future__ import annotations

import pytest

pytest.importorskip("torch._dynamo")

from benchmarks import compile_cost


def test_a_compiled_and_an_eager_measurement_of_lorsum():
    config = compile_cost.make_config("cpu", quick=True)
    results = [compile_cost.measure(config, "lorsum-x1", compiled) for compiled in (False, True)]
    for result in results:
        assert result["step_time_s"]["repeats"] == config["repeats"]
        assert result["first_step_s"] > 0
    summary = compile_cost.summarize(results)
    assert set(summary["compiled_over_eager"]) == {"lorsum-x1"}
    assert summary["compiled_over_eager"]["lorsum-x1"] > 0
    record = {"results": results}
    table = compile_cost.format_table(record)
    assert "| lorsum-x1 | compiled |" in table
    assert "| lorsum-x1 | eager |" in table
