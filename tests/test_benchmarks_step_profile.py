"""The step-profile suite: per phase, wall time, operators and (on a GPU) kernels."""

from __future__ import annotations

import json

import pytest
from benchmarks import step_profile


def test_a_quick_profile_splits_each_step_into_its_phases(tmp_path, capsys):
    pytest.importorskip("peft")
    methods = "lora-adamw,lorsum-x1-nomom"
    assert step_profile.main(["--quick", "--methods", methods, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "e2e-smollm2-cpu.json").read_text())
    by = {r["method"]: r for r in record["results"]}
    assert set(by) == {"lora-adamw", "lorsum-x1-nomom"}
    for result in by.values():
        for phase in step_profile.PHASES:
            assert result[phase]["wall_s"] > 0
            assert result[phase]["kernels"] is None  # no device on the CPU
        assert result["optimizer_step"]["operators"] > 0
    # The capture's hooks dispatch operators of their own in the forward and backward.
    fwd_bwd = {m: r["forward_backward"]["operators"] for m, r in by.items()}
    assert fwd_bwd["lorsum-x1-nomom"] > fwd_bwd["lora-adamw"]
    assert record["summary"]["step_over_lora_adamw"]["lora-adamw"] == 1.0
    assert "| lorsum-x1-nomom |" in capsys.readouterr().out


def test_an_unknown_method_is_named(capsys):
    with pytest.raises(SystemExit):
        step_profile.parse_args(["--methods", "lora-adamw,lorsum-x9"])
    assert "unknown method(s): lorsum-x9" in capsys.readouterr().err
