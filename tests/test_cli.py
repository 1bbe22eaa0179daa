"""The ``lorsum`` command line: the comparison runs, stores, skips and reports; errors are one
clear line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from math import inf
from pathlib import Path

import pytest
from benchmarks.compare import half_decade_grid
from benchmarks.tasks import synthetic

from lorsum.cli import find_harness_root, main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--variants", "deterministic", "--methods", "lora-sgd,svdlora,lorsum-x2", "--seeds", "2",
         "--steps", "5"]  # fmt: skip


def test_compare_trains_stores_plots_and_skips_finished_runs(tmp_path, capsys):
    assert main(["compare", *SMALL, "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for method in ("lora-sgd", "svdlora", "lorsum-x2"):
        assert method in printed
    runs = sorted(tmp_path.glob("synthetic-deterministic/*/lr*-seed*.json"))
    assert len(runs) == 6
    record = json.loads(runs[0].read_text())
    for key in ("config", "config_hash", "environment", "wall_time_s", "results", "summary"):
        assert key in record
    assert len(record["results"]["curves"]["excess_loss"]) == 5
    assert (tmp_path / "synthetic.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "synthetic-summary.json").read_text())
    assert "gap_closure_vs_lora_sgd" in summary["variants"]["deterministic"]

    before = {p: p.stat().st_mtime_ns for p in runs}
    assert main(["compare", *SMALL, "--out-dir", str(tmp_path), "--no-plot"]) == 0
    assert {p: p.stat().st_mtime_ns for p in runs} == before  # nothing re-run

    assert main(["report", "--out-dir", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## synthetic (deterministic)" in report
    assert "Gap closure" in report


def test_a_stored_run_is_found_wherever_its_data_were_mounted(tmp_path):
    args = ["compare", "--variants", "deterministic", "--methods", "lora-sgd", "--seeds", "1",
            "--steps", "3", "--out-dir", str(tmp_path), "--no-plot"]  # fmt: skip
    assert main(args) == 0
    (run,) = tmp_path.glob("synthetic-deterministic/lora-sgd/lr*-seed0*.json")
    record = json.loads(run.read_text())
    record["config"]["data_dir"] = "/tmp/d"  # as if made on a machine that mounted data there
    run.write_text(json.dumps(record))
    made = run.stat().st_mtime_ns
    assert main(args) == 0
    assert run.stat().st_mtime_ns == made  # the same run: not trained again


def test_a_stored_run_of_another_config_is_never_replaced_without_force(tmp_path, capsys):
    args = ["compare", "--variants", "deterministic", "--methods", "lora-sgd", "--seeds", "1",
            "--steps", "3", "--out-dir", str(tmp_path), "--no-plot"]  # fmt: skip
    assert main(args) == 0
    (run,) = tmp_path.glob("synthetic-deterministic/lora-sgd/lr*-seed0*.json")
    record = json.loads(run.read_text())
    record["config"]["hparams"] = {"momentum": 0.5}  # as if made by an older method table
    run.write_text(json.dumps(record))
    capsys.readouterr()

    assert main(args) == 2  # it would train over a finished run: refused, the file named
    line = _one_error_line(capsys)
    assert str(run) in line
    assert "hparams" in line
    assert "--force" in line
    assert json.loads(run.read_text())["config"]["hparams"] == {"momentum": 0.5}

    assert main([*args, "--force"]) == 0  # asked for: replaced
    assert json.loads(run.read_text())["config"]["hparams"] != {"momentum": 0.5}


def test_a_run_of_another_budget_gets_its_own_file(tmp_path, capsys):
    common = ["compare", "--variants", "deterministic", "--methods", "lora-sgd", "--seeds", "1",
              "--lr", "0.01", "--out-dir", str(tmp_path), "--no-plot"]  # fmt: skip
    budget = synthetic.default_steps("deterministic")
    assert main(common) == 0
    assert main([*common, "--steps", "3"]) == 0
    runs = sorted(p.name for p in tmp_path.glob("synthetic-deterministic/lora-sgd/*.json"))
    assert runs == ["lr0.01-seed0-steps3.json", "lr0.01-seed0.json"]
    steps = {
        name: json.loads((tmp_path / "synthetic-deterministic/lora-sgd" / name).read_text())[
            "config"
        ]["steps"]
        for name in runs
    }
    assert steps == {"lr0.01-seed0-steps3.json": 3, "lr0.01-seed0.json": budget}

    assert main(["report", "--out-dir", str(tmp_path)]) == 0  # never averaged as two seeds
    report = (tmp_path / "report.md").read_text()
    assert "## synthetic (deterministic)\n" in report
    assert "## synthetic (deterministic), 3 steps\n" in report


def test_an_lr_sweep_keeps_the_best_rate_per_method(tmp_path):
    args = [
        "compare",
        "--variants",
        "deterministic",
        "--methods",
        "lora-sgd",
        "--seeds",
        "1",
        "--steps",
        "5",
        "--lr-sweep",
        "0.01,0.001",
        "--out-dir",
        str(tmp_path),
        "--no-plot",
    ]
    assert main(args) == 0  # fmt: skip
    entry = json.loads((tmp_path / "synthetic-summary.json").read_text())
    entry = entry["variants"]["deterministic"]["methods"]["lora-sgd"]
    assert [s["lr"] for s in entry["sweep"]] == [0.001, 0.01]
    assert entry["final_mean"] == min(s["final_mean"] for s in entry["sweep"])


def test_parallel_jobs_store_the_same_runs_as_one_process(tmp_path):
    sequential, parallel = tmp_path / "one", tmp_path / "two"
    assert main(["compare", *SMALL, "--out-dir", str(sequential), "--no-plot"]) == 0
    assert main(["compare", *SMALL, "--out-dir", str(parallel), "--no-plot", "--jobs", "2"]) == 0
    runs = sorted(p.relative_to(sequential) for p in sequential.glob("*/*/lr*-seed*.json"))
    assert len(runs) == 6
    for run in runs:
        one = json.loads((sequential / run).read_text())["results"]["curves"]["excess_loss"]
        two = json.loads((parallel / run).read_text())["results"]["curves"]["excess_loss"]
        # The same run, up to the order of float sums (a worker has fewer threads): the loss,
        # near 1.1e5 in float32, may differ by an ulp (2**-7) before f* is subtracted.
        assert two == pytest.approx(one, abs=4 * 2**-7)


def test_a_sweep_s_rates_are_reused_and_summaries_rebuilt_from_stored_runs(tmp_path, capsys):
    sweep = ["compare", "--variants", "deterministic", "--methods", "lora-sgd,lorsum-x1",
             "--steps", "4", "--no-plot"]  # fmt: skip
    assert main([*sweep, "--seeds", "1", "--lr-sweep", "0.5,0.01", "--out-dir", str(tmp_path),
                 "--name", "sweep"]) == 0  # fmt: skip
    chosen = json.loads((tmp_path / "sweep-summary.json").read_text())
    chosen = {m: e["lr"] for m, e in chosen["variants"]["deterministic"]["methods"].items()}
    summary_file = str(tmp_path / "sweep-summary.json")
    assert (
        main([*sweep, "--seeds", "2", "--lr-from", summary_file, "--out-dir", str(tmp_path)]) == 0
    )
    summary = json.loads((tmp_path / "synthetic-summary.json").read_text())
    methods = summary["variants"]["deterministic"]["methods"]
    assert {m: e["lr"] for m, e in methods.items()} == chosen
    assert all(e["seeds"] == [0, 1] for e in methods.values())

    (tmp_path / "synthetic-summary.json").unlink()
    again = [*sweep, "--seeds", "2", "--lr-from", summary_file, "--out-dir", str(tmp_path)]
    assert main([*again, "--summarize-only"]) == 0
    assert json.loads((tmp_path / "synthetic-summary.json").read_text()) == summary
    assert main([*sweep, "--seeds", "1", "--lr", "0.123", "--methods", "lora-sgd",
                 "--out-dir", str(tmp_path), "--summarize-only"]) == 2  # fmt: skip
    assert "1 of 1 runs are not stored" in _one_error_line(capsys)
    assert main([*sweep, "--methods", "lora-adamw", "--lr-from", summary_file,
                 "--out-dir", str(tmp_path)]) == 2  # fmt: skip
    assert "selects a learning rate for lora-adamw" in _one_error_line(capsys)


def test_a_sweep_around_each_method_s_rate_moves_by_half_decades(tmp_path):
    assert half_decade_grid(0.1, [-1, 0, 1]) == [0.03, 0.1, 0.3]
    assert half_decade_grid(3e-4, [2, -2, 0]) == [3e-5, 3e-4, 3e-3]
    assert half_decade_grid(0.05, [0]) == [0.03]  # snapped: log10(0.05) is nearer log10(0.03)
    with pytest.raises(ValueError, match=r"Invalid rate: 0\.0"):
        half_decade_grid(0.0, [0])
    sweep = ["compare", "--variants", "deterministic", "--methods", "lora-sgd,lorsum-x1",
             "--steps", "2", "--no-plot", "--seeds", "1", "--out-dir", str(tmp_path)]  # fmt: skip
    assert main([*sweep, "--lr-sweep", "0.1,0.01", "--name", "first"]) == 0
    assert main([*sweep, "--lr-sweep-around=-1,1", "--lr-from",
                 str(tmp_path / "first-summary.json"), "--name", "around"]) == 0  # fmt: skip
    first = json.loads((tmp_path / "first-summary.json").read_text())["variants"]["deterministic"]
    around = json.loads((tmp_path / "around-summary.json").read_text())["variants"]
    for method, entry in around["deterministic"]["methods"].items():
        centre = first["methods"][method]["lr"]
        assert [s["lr"] for s in entry["sweep"]] == half_decade_grid(centre, [-1, 1])
    with pytest.raises(SystemExit):
        main([*sweep, "--lr-sweep-around", "0", "--lr", "0.1"])


def test_one_variant_s_rates_serve_every_variant(tmp_path, capsys):
    common = ["compare", "--methods", "lora-sgd", "--steps", "2", "--no-plot", "--seeds", "1",
              "--out-dir", str(tmp_path)]  # fmt: skip
    assert main([*common, "--variants", "deterministic", "--lr", "0.07", "--name", "one"]) == 0
    source = f"{tmp_path / 'one-summary.json'}:deterministic"
    assert main([*common, "--lr-from", source, "--name", "both"]) == 0
    both = json.loads((tmp_path / "both-summary.json").read_text())["variants"]
    assert {v: d["methods"]["lora-sgd"]["lr"] for v, d in both.items()} == {
        "deterministic": 0.07, "stochastic": 0.07,
    }  # fmt: skip
    assert main([*common, "--lr-from", f"{tmp_path / 'one-summary.json'}:noisy"]) == 2
    assert "has no variant 'noisy'" in _one_error_line(capsys)


def test_console_script_help_explains_the_options():
    result = subprocess.run(
        [sys.executable, "-m", "lorsum.cli", "compare", "--help"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0
    for option in ("--task", "--methods", "--seeds", "--steps", "--lr-sweep", "--device",
                   "--data-dir", "--out-dir", "--force"):  # fmt: skip
        assert option in result.stdout


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["compare", "--seeds", "0"], "must be a positive integer"),
        (["compare", "--lr", "-1"], "must be a positive number"),
        (["compare", "--task", "mnist"], "invalid choice: 'mnist'"),
        (["compare", "--variants", "noisy"], "unknown variant 'noisy'"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_clear_line(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_unknown_methods_and_commands_fail_clearly(tmp_path, capsys):
    assert main(["compare", "--methods", "lorsum-x3", "--out-dir", str(tmp_path)]) == 2
    assert "unknown method(s) lorsum-x3" in _one_error_line(capsys)
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2


def _one_error_line(capsys) -> str:
    """The command's stderr, checked to be one ``lorsum ...: error: ...`` line (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # Progress bars of earlier runs may precede it (carriage returns): the error is the last line.
    line = err.strip().replace("\r", "\n").splitlines()[-1]
    assert line.startswith(("lorsum compare: error: ", "lorsum report: error: ")), err
    return line


@pytest.mark.parametrize("task", ["glue", "squad", "lm", "image"])
def test_a_missing_data_directory_is_one_line_and_exit_2(task, tmp_path, capsys):
    # tmp_path has none of the shared data files (and a machine may also lack the model
    # package, which fails the same way): the user gets one line naming what is missing.
    argv = ["compare", "--task", task, "--data-dir", str(tmp_path / "nowhere"), "--seeds", "1",
            "--steps", "1", "--methods", "lora-adamw", "--no-plot",
            "--out-dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "nowhere" in line or "not installed" in line


def test_a_malformed_data_file_is_one_line_and_exit_2(tmp_path, capsys):
    squad = tmp_path / "squad-v2-cs224n"
    squad.mkdir()
    (squad / "dev-v2.0.json").write_text("{not json")
    argv = ["compare", "--task", "squad", "--data-dir", str(tmp_path), "--seeds", "1",
            "--steps", "1", "--methods", "lora-adamw", "--no-plot",
            "--out-dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "is not SQuAD v2 JSON" in _one_error_line(capsys)


def test_report_without_runs_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["report", "--out-dir", str(tmp_path)]) == 2
    assert "no run files under" in _one_error_line(capsys)


def test_the_harness_is_found_only_in_a_checkout(tmp_path):
    assert find_harness_root([tmp_path]) is None
    assert find_harness_root([tmp_path, REPO]) == REPO


def test_a_diverged_seed_makes_the_spread_nan_not_a_crash():
    from benchmarks.compare import summarize
    from benchmarks.tasks import TASKS

    def record(seed, value):
        config = {"variant": "deterministic", "method": "lora-sgd", "lr": 0.1, "seed": seed}
        results = {"final": {"excess_loss": value}, "curves": {"excess_loss": [value]}}
        return {"config": config, "results": results, "wall_time_s": 1.0}

    task = TASKS["synthetic"]
    summary = summarize(task, "synthetic", ["deterministic"], [record(0, 2.0), record(1, inf)])
    entry = summary["variants"]["deterministic"]["methods"]["lora-sgd"]
    assert entry["final_mean"] == inf
    assert entry["final_std"] != entry["final_std"]  # NaN
    single = summarize(task, "synthetic", ["deterministic"], [record(0, 2.0)])
    assert single["variants"]["deterministic"]["methods"]["lora-sgd"]["final_std"] == 0.0


def test_rates_are_ranked_on_the_seeds_they_share_not_on_one_lucky_seed():
    from benchmarks.compare import summarize
    from benchmarks.tasks import TASKS

    def record(lr, seed, value):
        config = {"variant": "deterministic", "method": "lora-sgd", "lr": lr, "seed": seed}
        results = {"final": {"excess_loss": value}, "curves": {"excess_loss": [value]}}
        return {"config": config, "results": results, "wall_time_s": 1.0}

    # A sweep on seed 0 chose 0.1 (2.0 < 3.0); seeds 1 and 2 at 0.1 then came out worse, so
    # 0.1's three-seed mean (4.0) is above 0.3's single seed. Ranked on seed 0, 0.1 stays.
    store = [record(0.3, 0, 3.0), record(0.1, 0, 2.0), record(0.1, 1, 5.0), record(0.1, 2, 5.0)]
    summary = summarize(TASKS["synthetic"], "synthetic", ["deterministic"], store)
    entry = summary["variants"]["deterministic"]["methods"]["lora-sgd"]
    assert (entry["lr"], entry["seeds"], entry["final_mean"]) == (0.1, [0, 1, 2], 4.0)
    assert entry["sweep"] == [{"lr": 0.1, "final_mean": 2.0}, {"lr": 0.3, "final_mean": 3.0}]
    # Rates that share no seed are ranked on all of their own.
    apart = summarize(
        TASKS["synthetic"],
        "synthetic",
        ["deterministic"],
        [record(0.3, 0, 3.0), record(0.1, 1, 5.0)],
    )
    assert apart["variants"]["deterministic"]["methods"]["lora-sgd"]["lr"] == 0.3


def test_a_summary_also_holds_the_mean_and_spread_of_every_other_final_number():
    from benchmarks.compare import summarize
    from benchmarks.tasks import TASKS

    def record(seed, value, has_ans_f1):
        config = {"variant": "deterministic", "method": "lora-sgd", "lr": 0.1, "seed": seed}
        final = {"excess_loss": value, "HasAns_f1": has_ans_f1, "total": 10, "ok": True}
        final["note"] = "not a number"
        return {"config": config, "results": {"final": final, "curves": {"excess_loss": [value]}},
                "wall_time_s": 1.0}  # fmt: skip

    store = [record(0, 1.0, 2.0), record(1, 3.0, 6.0)]
    summary = summarize(TASKS["synthetic"], "synthetic", ["deterministic"], store)
    other = summary["variants"]["deterministic"]["methods"]["lora-sgd"]["other_finals"]
    assert set(other) == {"HasAns_f1", "total"}  # not the metric itself, a flag or a string
    assert other["HasAns_f1"]["mean"] == 4.0
    assert other["HasAns_f1"]["std"] == pytest.approx(2.0**1.5)
    assert other["total"] == {"mean": 10.0, "std": 0.0}


def test_a_summary_names_the_run_files_it_aggregates():
    from benchmarks.compare import summarize
    from benchmarks.tasks import TASKS

    def record(lr, seed, steps):
        config = {"task": "synthetic", "variant": "deterministic", "method": "lora-sgd",
                  "lr": lr, "seed": seed, "steps": steps}  # fmt: skip
        results = {"final": {"excess_loss": lr}, "curves": {"excess_loss": [lr]}}
        return {"config": config, "results": results, "wall_time_s": 1.0}

    default = TASKS["synthetic"].default_steps("deterministic")
    store = [record(0.1, 0, default), record(0.1, 1, default), record(0.3, 0, 7)]
    summary = summarize(TASKS["synthetic"], "synthetic", ["deterministic"], store)
    assert summary["variants"]["deterministic"]["methods"]["lora-sgd"]["run_files"] == [
        "synthetic-deterministic/lora-sgd/lr0.1-seed0.json",
        "synthetic-deterministic/lora-sgd/lr0.1-seed1.json",
        "synthetic-deterministic/lora-sgd/lr0.3-seed0-steps7.json",
    ]


def test_a_failed_run_in_a_worker_leaves_the_others_stored(tmp_path, monkeypatch, capsys):
    from benchmarks import compare

    good = {
        "task": "synthetic",
        "variant": "deterministic",
        "method": "lora-sgd",
        "optimizer": "sgd",
        "hparams": {},
        "steps": 3,
        "device": "cpu",
        "data_dir": None,
    }
    bad = {**good, "method": "no-such-method"}  # the task raises in the worker
    todo = [{**bad, "lr": 0.01, "seed": 0}, *({**good, "lr": 0.01, "seed": s} for s in range(3))]
    with pytest.raises(compare._cli.UserError, match="1 of 4 runs failed") as error:
        compare._execute_in_processes(todo, tmp_path, 2)
    assert "no-such-method" in str(error.value)
    stored = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.json"))
    assert [(p.parent.name, "seed" in p.name) for p in stored] == [("lora-sgd", True)] * 3


def _out_of_gpu_memory_at_first(work):
    """A stand-in worker (module level, so spawned processes can load it): seed 0 runs out of
    GPU memory once, seed 1 every time, seed 2 never; each attempt leaves a file."""
    config, out_dir, wait_s = work
    seed = config["seed"]
    tries = len(list(Path(out_dir).glob(f"try-{seed}-*")))
    Path(out_dir, f"try-{seed}-{tries}-waited-{wait_s:g}").touch()
    if seed == 1 or (seed == 0 and tries == 0):
        return f"run {seed}: OutOfMemoryError: CUDA out of memory", True
    return None


def test_a_run_out_of_gpu_memory_is_queued_again_behind_the_others(tmp_path):
    from benchmarks import compare

    todo = [{"method": "lora-sgd", "lr": 0.01, "seed": seed} for seed in range(3)]
    with pytest.raises(compare._cli.UserError, match="1 of 3 runs failed") as error:
        compare._execute_in_processes(
            todo, tmp_path, 2, worker=_out_of_gpu_memory_at_first, wait_s=0.01
        )
    assert "run 1: OutOfMemoryError" in str(error.value)
    assert "run 0" not in str(error.value)
    tries = sorted(p.name for p in tmp_path.glob("try-*"))
    retries = compare.OUT_OF_MEMORY_RETRIES
    assert tries == sorted(
        ["try-0-0-waited-0", "try-0-1-waited-0.01", "try-2-0-waited-0"]
        + [f"try-1-{n}-waited-{0.01 * n:g}" for n in range(retries + 1)]
    )


def test_only_the_gpus_allocator_running_out_is_worth_a_retry():
    import torch
    from benchmarks.compare import _is_gpu_out_of_memory

    assert _is_gpu_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not _is_gpu_out_of_memory(MemoryError())
    assert not _is_gpu_out_of_memory(RuntimeError("CUDA error: device-side assert"))
