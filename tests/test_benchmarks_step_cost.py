"""The step_cost benchmark: its grid, its skip rule for dense methods, and a quick run's records."""

from __future__ import annotations

import json
import statistics

import pytest
from benchmarks import step_cost


def test_the_axes_vary_one_coordinate_of_the_base_at_a_time():
    config = step_cost.part_configs("cpu", quick=True)["axes"]
    found = step_cost.points(config)
    base = config["base"]
    assert base in found
    for point in found:
        assert sum(point[k] != base[k] for k in base) <= 1
    assert len(found) == len({tuple(sorted(p.items())) for p in found})  # no point twice


def test_the_full_cpu_grid_leaves_dense_methods_out_above_its_limit():
    config = step_cost.part_configs("cpu", quick=False)["axes"]
    assert config["dense_methods_up_to_m"] == 1024
    assert max(config["axes"]["m"]) == 4096
    target = step_cost.part_configs("cpu", quick=False)["target"]
    assert target["points"] == [{"m": 4096, "r": 16, "N": 4096, "L": 1}]
    assert {"lorsum-x1", "svdlora", "lora-pro"} <= set(target["methods"])


def test_a_quick_run_records_times_state_and_the_target_ratio(tmp_path, capsys):
    assert step_cost.main(["--quick", "--parts", "axes,target", "--out", str(tmp_path)]) == 0
    axes = json.loads((tmp_path / "axes-cpu.json").read_text())
    config = axes["config"]
    assert len(axes["results"]) == len(step_cost.points(config)) * len(config["methods"])
    by = {(r["method"], r["m"], r["r"], r["N"], r["L"]): r for r in axes["results"]}
    base = config["base"]
    key = (base["m"], base["r"], base["N"], base["L"])
    for record in axes["results"]:
        assert record["step_time_s"]["repeats"] == config["repeats"]
        assert record["step_time_s"]["median_s"] > 0
    # LoRA-Pro keeps two full m × n moments per layer; LoRSum without momentum keeps counters.
    m, layers = base["m"], base["L"]
    assert by[("lora-pro", *key)]["state_bytes"] >= 2 * 4 * m * m * layers
    assert by[("lorsum-x1", *key)]["state_bytes"] < 4 * m * m
    target = json.loads((tmp_path / "target-cpu.json").read_text())
    ratio = target["summary"]["svdlora_over_lorsum_x1"]
    medians = target["summary"]["median_step_s"]
    assert ratio == pytest.approx(medians["svdlora"] / medians["lorsum-x1"])
    assert (tmp_path / "axes-cpu.png").stat().st_size > 0  # step time against m = n
    out = capsys.readouterr().out
    assert "| lorsum-x1 |" in out
    assert "SVDLoRA / LoRSum(1 sweep)" in out
    # A second run finds both parts stored and trains nothing.
    assert step_cost.main(["--quick", "--parts", "axes,target", "--out", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().err


def test_quick_results_never_overwrite_the_committed_ones():
    with pytest.raises(SystemExit):
        step_cost.main(["--quick", "--out", str(step_cost.DEFAULT_OUT)])


def test_the_ceilings_give_every_point_a_floor_and_a_fraction(tmp_path, capsys):
    assert step_cost.main(["--quick", "--parts", "target,ceilings", "--out", str(tmp_path)]) == 0
    ceilings = json.loads((tmp_path / "ceilings-cpu.json").read_text())["results"][0]
    assert ceilings["matmul_flops_per_s"] > 0
    assert ceilings["copy_bytes_per_s"] > 0
    target = json.loads((tmp_path / "target-cpu.json").read_text())
    point = step_cost.with_cost_model(target["results"][0], ceilings)
    assert point["floor_s"] > 0
    assert point["fraction_of_floor"] == pytest.approx(
        point["floor_s"] / point["step_time_s"]["median_s"]
    )
    out = capsys.readouterr().out
    assert out.index("### ceilings") < out.index("### target")  # measured first, then used
    assert "floor / step" in out


def test_unknown_parts_are_named(capsys):
    with pytest.raises(SystemExit):
        step_cost.main(["--quick", "--parts", "axes,speed"])
    assert "unknown part(s): speed" in capsys.readouterr().err


def test_a_quick_end_to_end_run_times_whole_training_steps(tmp_path, capsys, monkeypatch):
    pytest.importorskip("peft")
    from tests.test_benchmarks_glue import tiny_bert

    monkeypatch.setattr("benchmarks.pretrained.load_minilm", tiny_bert)
    assert step_cost.main(["--quick", "--parts", "e2e-minilm", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "e2e-minilm-cpu.json").read_text())
    medians = record["summary"]["median_step_s"]
    assert set(medians) == {
        "lora-adamw", "lorsum-x1-nomom", "lorsum-x1-nomom-no-factor-grads",
        "lorsum-x1-nomom-in-backward", "lorsum-x1-nomom-in-backward-bucketed", "frozen-adapters",
    }  # fmt: skip
    ratio = medians["lorsum-x1-nomom"] / medians["lora-adamw"]
    assert record["summary"]["lorsum_x1_over_lora_adamw"] == pytest.approx(ratio)
    skipped = medians["lorsum-x1-nomom-no-factor-grads"] / medians["lora-adamw"]
    assert record["summary"]["lorsum_x1_no_factor_grads_over_lora_adamw"] == pytest.approx(skipped)
    by = {r["method"]: r for r in record["results"]}
    assert by["lora-adamw"]["state_bytes"] > 0  # AdamW's moments of the adapters and the head
    if by["lora-adamw"]["peak_bytes"] is not None:  # Linux: the resident-set peak is read
        for result in by.values():
            assert 0 < result["peak_above_setup_bytes"] <= result["peak_bytes"]
        ratios = record["summary"]["peak_above_setup_over_lora_adamw"]
        assert ratios["lora-adamw"] == 1.0
        assert set(ratios) == set(medians)
    assert (tmp_path / "e2e-minilm-cpu.png").stat().st_size > 0
    assert "LoRSum(1 sweep) / LoRA-AdamW training step" in capsys.readouterr().out


def test_a_quick_smollm2_run_adapts_all_seven_linears_under_bf16_autocast(
    tmp_path, capsys, monkeypatch
):
    pytest.importorskip("peft")
    from tests.test_benchmarks_lm import build_tiny_llama

    built = []

    def load():
        built.append(build_tiny_llama())
        return built[-1], None

    monkeypatch.setattr("benchmarks.pretrained.load_smollm2", load)
    assert step_cost.main(["--quick", "--parts", "e2e-smollm2", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "e2e-smollm2-cpu.json").read_text())
    assert record["config"]["autocast"] == "bfloat16"
    assert set(record["summary"]["median_step_s"]) == {
        "lora-adamw", "lorsum-x1-nomom", "lorsum-x1-nomom-no-factor-grads",
        "lorsum-x1-nomom-in-backward", "lorsum-x1-nomom-in-backward-bucketed", "frozen-adapters",
    }  # fmt: skip
    adapted = {
        name.split(".")[-2] for name, _ in built[0].named_modules() if name.endswith("lora_A")
    }
    assert adapted == set(step_cost.SMOLLM2_TARGETS)
    interleaved = record["interleaved"]
    assert interleaved["methods"] == list(step_cost.INTERLEAVED)
    for method in step_cost.INTERLEAVED:
        assert interleaved["step_time_s"][method]["repeats"] == record["config"]["rounds"]
        median = statistics.median(interleaved["over_first_per_round"][method])
        assert interleaved["median_over_first"][method] == pytest.approx(median)
    assert interleaved["median_over_first"]["lora-adamw"] == 1.0
    ratio = record["summary"]["interleaved_lorsum_x1_over_lora_adamw"]
    assert ratio == interleaved["median_over_first"]["lorsum-x1-nomom"]
    assert record["summary"]["met"] == (ratio <= step_cost.E2E_TARGET["cpu"])
    out = capsys.readouterr().out
    assert "### e2e-smollm2" in out
    assert "stepped in turn" in out


def test_an_isolated_end_to_end_part_measures_each_method_in_its_own_process(monkeypatch):
    pytest.importorskip("peft")
    config = step_cost.part_configs("cpu", True, "random")["e2e-smollm2"]
    config = {**config, "methods": ["lora-adamw"], "isolated": True, "repeats": 1}

    def in_this_process(*args, **kwargs):
        raise AssertionError("an isolated part measured a method in the parent process")

    # The spawned child imports the module afresh, without this patch.
    monkeypatch.setattr(step_cost, "measure_e2e", in_this_process)
    record = step_cost.run_part(config)
    (result,) = record["results"]
    assert result["method"] == "lora-adamw"
    assert result["step_time_s"]["repeats"] == 1
    assert result["step_time_s"]["median_s"] > 0
    assert result["state_bytes"] > 0


def test_an_isolated_part_cut_short_goes_on_after_its_finished_methods(tmp_path, monkeypatch):
    config = step_cost.part_configs("cpu", True, "random")["e2e-smollm2"]
    config = {**config, "methods": ["lora-adamw", "lorsum-x1-nomom", "frozen-adapters"]}
    config = {**config, "isolated": True, "interleaved": []}
    measured, killed = [], []

    class KilledError(Exception):
        pass

    def fake(function, method, config):
        if method == "frozen-adapters" and not killed:
            killed.append(method)
            raise KilledError  # the first invocation dies here (a device call's time limit, say)
        measured.append(method)
        timing = {"median_s": 0.1, "min_s": 0.1, "max_s": 0.1, "repeats": 1, "times_s": [0.1]}
        return {
            "method": method, "step_time_s": timing, "optimizer_step_time_s": timing,
            "state_bytes": 0, "peak_bytes": None, "peak_above_setup_bytes": None,
        }  # fmt: skip

    monkeypatch.setattr(step_cost, "in_fresh_process", fake)
    progress = tmp_path / "e2e.partial.json"
    with pytest.raises(KilledError):
        step_cost.run_part(config, progress)
    assert measured == ["lora-adamw", "lorsum-x1-nomom"]
    record = step_cost.run_part(config, progress)
    assert measured == ["lora-adamw", "lorsum-x1-nomom", "frozen-adapters"]
    assert [r["method"] for r in record["results"]] == config["methods"]
    assert record["resumed_methods"] == ["lora-adamw", "lorsum-x1-nomom"]
    # A partial record of another config is not resumed.
    other = {**config, "repeats": 3}
    measured.clear()
    step_cost.run_part(other, progress)
    assert measured == config["methods"]


def test_the_gpu_smollm2_part_isolates_its_methods():
    config = step_cost.part_configs("cuda", False, "random")["e2e-smollm2"]
    assert config["isolated"]
    assert config["repeats"] >= 10


def test_summarize_only_reads_stored_parts_and_names_a_missing_one(tmp_path, capsys):
    assert step_cost.main(["--quick", "--parts", "ceilings", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    args = ["--quick", "--summarize-only", "--out", str(tmp_path)]
    assert step_cost.main([*args, "--parts", "ceilings"]) == 0
    assert "### ceilings" in capsys.readouterr().out
    assert step_cost.main([*args, "--parts", "target"]) == 1
    assert "target-cpu.json is missing" in capsys.readouterr().err


def test_a_quick_stacking_run_times_each_stacking_optimizer_alone_and_stacked(tmp_path, capsys):
    assert step_cost.main(["--quick", "--parts", "stacking", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "stacking-cpu.json").read_text())
    measured = {(r["method"], r["L"]) for r in record["results"]}
    for method in step_cost.STACKING_METHODS:
        for L in (1, 2):
            assert {(method, L), (method + step_cost.ALONE, L)} <= measured
    speedup = record["summary"]["alone_over_stacked"]
    assert sorted(speedup) == sorted(step_cost.STACKING_METHODS)
    assert all(set(by_L) == {"1", "2"} and min(by_L.values()) > 0 for by_L in speedup.values())
    assert "lora-pro-alone" in capsys.readouterr().out
