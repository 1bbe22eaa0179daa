"""The step-profile suite: per phase, wall time, operators and (on a GPU) kernels."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
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
    assert not (tmp_path / "e2e-smollm2-cpu.partial.json").exists()  # replaced by the record


def test_a_profile_cut_short_keeps_the_methods_it_finished(tmp_path, monkeypatch):
    config = {"device": "cpu", "part": "e2e-smollm2", "methods": ["lora-adamw", "lorsum-x1"]}
    finished = {"method": "lora-adamw"}
    for phase in step_profile.PHASES:
        finished[phase] = {"wall_s": 0.1, "operators": 1.0, "kernels": None, "device_busy_s": None}

    def one_then_killed(function, method, config):
        if method != "lora-adamw":
            raise KeyboardInterrupt  # the time limit's kill, as far as the parent sees it
        return finished

    monkeypatch.setattr(step_profile.step_cost, "in_fresh_process", one_then_killed)
    progress = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        step_profile.run(config, progress)
    record = json.loads(progress.read_text())
    assert record["partial"] is True
    assert [r["method"] for r in record["results"]] == ["lora-adamw"]


def test_an_unknown_method_is_named(capsys):
    with pytest.raises(SystemExit):
        step_profile.parse_args(["--methods", "lora-adamw,lorsum-x9"])
    assert "unknown method(s): lorsum-x9" in capsys.readouterr().err


def test_quick_results_never_overwrite_the_committed_ones(capsys):
    with pytest.raises(SystemExit):
        step_profile.parse_args(["--quick", "--out", str(step_profile.DEFAULT_OUT)])
    assert "must not overwrite the committed results" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        step_profile.parse_args(["--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err


def test_only_kernels_count_as_device_time():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, device_type, annotation=False):
        return SimpleNamespace(name=name, device_type=device_type, is_user_annotation=annotation)

    assert step_profile._is_device_kernel(event("nvjet_sm90_tst_192x96", cuda))
    # A phase's range on the device's timeline spans its kernels and the idle gaps between them.
    assert not step_profile._is_device_kernel(event("Optimizer.step#LoRSum.step", cuda, True))
    assert not step_profile._is_device_kernel(event("cudaLaunchKernel", cuda))
    assert not step_profile._is_device_kernel(event("aten::mm", cpu))
