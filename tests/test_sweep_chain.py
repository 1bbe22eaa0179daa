"""``benchmarks.sweep_chain``: sweep until the choice is inside the grid, then the seeds."""

from __future__ import annotations

import json

import pytest
from benchmarks import sweep_chain


def _summary(entries: dict[str, tuple[float, dict[float, float]]]) -> dict:
    """A compare summary of one variant: method -> (chosen lr, {lr: final mean})."""
    return {
        "variants": {
            "v": {
                "methods": {
                    method: {
                        "lr": chosen,
                        "sweep": [{"lr": lr, "final_mean": value} for lr, value in points.items()],
                    }
                    for method, (chosen, points) in entries.items()
                }
            }
        }
    }


def test_an_end_is_the_smallest_or_largest_rate_unless_the_sweep_is_flat():
    summary = _summary(
        {
            "low": (0.01, {0.01: 0.9, 0.03: 0.8, 0.1: 0.1}),
            "high": (0.1, {0.01: 0.1, 0.03: 0.2, 0.1: 0.3}),
            "inside": (0.03, {0.01: 0.1, 0.03: 0.9, 0.1: 0.2}),
            "flat": (0.01, {0.01: 0.0, 0.03: 0.0, 0.1: 0.0}),  # a tie: nowhere to go
            "single": (0.03, {0.03: 0.5}),  # not swept
        }
    )
    assert sweep_chain.at_an_end(summary) == [("v", "low"), ("v", "high")]


class _FakeCompare:
    """Records each stage's arguments and writes the summary it names, choosing from a script:
    one ``(chosen, points)`` for method "m", or a dict ``method -> (chosen, points)``."""

    def __init__(self, out_dir, choices):
        self.out_dir, self.choices, self.calls = out_dir, list(choices), []

    def __call__(self, argv):
        self.calls.append(argv)
        name = argv[argv.index("--name") + 1]
        entries = self.choices.pop(0)
        summary = _summary(entries if isinstance(entries, dict) else {"m": entries})
        (self.out_dir / f"{name}-summary.json").write_text(json.dumps(summary))
        return 0


class _FakeLaunch:
    """Records the arguments of each compare started beside the chain; each exits ``status``."""

    def __init__(self, status=0):
        self.status, self.calls, self.waited = status, [], 0

    def __call__(self, argv):
        self.calls.append(argv)
        return self

    def wait(self):
        self.waited += 1
        return self.status


def _value(argv, option):
    """The value of the last ``option VALUE`` in ``argv``."""
    return argv[len(argv) - 1 - argv[::-1].index(option) + 1]


def test_the_chain_re_centres_while_at_an_end_then_trains_the_seeds(tmp_path, monkeypatch):
    fake = _FakeCompare(
        tmp_path,
        [
            (0.1, {0.01: 0.1, 0.03: 0.2, 0.1: 0.3}),  # s1: top end
            (0.3, {0.03: 0.2, 0.1: 0.3, 0.3: 0.4}),  # s2: top end again
            (0.3, {0.1: 0.3, 0.3: 0.4, 1.0: 0.1}),  # s3: inside
            (0.3, {0.3: 0.4}),  # the seeds
        ],
    )
    monkeypatch.setattr(sweep_chain, "_compare", fake)
    monkeypatch.setattr(sweep_chain, "_launch", _FakeLaunch())
    given = ["--task", "glue", "--out-dir", str(tmp_path), "--lr-from", "first.json"]
    assert sweep_chain.main(["run", "--around=-2,-1,0", "--seeds", "4", "--", *given]) == 0

    names = [call[call.index("--name") + 1] for call in fake.calls]
    assert names == ["run-s1", "run-s2", "run-s3", "run-tuned"]
    first, *extensions, tuned = fake.calls
    assert "--lr-sweep-around=-2,-1,0" in first
    assert first[first.index("--lr-from") + 1] == "first.json"  # the user's rates start it
    for call, source in zip(extensions, ["run-s1", "run-s2"], strict=True):
        assert call.count("--lr-from") == 1  # later stages read only the chain's own summaries
        assert call[call.index("--lr-from") + 1] == str(tmp_path / f"{source}-summary.json")
        assert "--lr-sweep-around=-1,0,1" in call
        assert _value(call, "--methods") == "m"
    sources = [tuned[i + 1] for i, arg in enumerate(tuned) if arg == "--lr-from"]
    assert sources == [str(tmp_path / f"run-s{k}-summary.json") for k in (1, 2, 3)]  # later wins
    assert _value(tuned, "--seeds") == "4"


def test_the_settled_seeds_train_beside_the_extensions_sharing_the_jobs(tmp_path, monkeypatch):
    inside = (0.03, {0.01: 0.1, 0.03: 0.9, 0.1: 0.2})
    fake = _FakeCompare(
        tmp_path,
        [
            {"a": inside, "b": inside, "c": inside, "end": (0.1, {0.01: 0.1, 0.03: 0.2, 0.1: 0.3})},
            {"end": (0.1, {0.03: 0.2, 0.1: 0.3, 0.3: 0.1})},  # s2: inside now
            {"a": inside, "b": inside, "c": inside, "end": (0.1, {0.1: 0.3})},  # the seeds
        ],
    )
    launch = _FakeLaunch()
    monkeypatch.setattr(sweep_chain, "_compare", fake)
    monkeypatch.setattr(sweep_chain, "_launch", launch)
    given = ["--task", "lm", "--methods", "a,b,c,end", "--jobs", "7", "--out-dir", str(tmp_path)]
    assert sweep_chain.main(["run", "--", *given]) == 0

    (beside,) = launch.calls
    assert launch.waited == 1  # the last stage waits for it
    assert _value(beside, "--methods") == "a,b,c"
    assert _value(beside, "--lr-from") == str(tmp_path / "run-s1-summary.json")
    assert _value(beside, "--seeds") == "3"
    extension = fake.calls[1]
    assert _value(extension, "--methods") == "end"
    # 1 extension run against 3 × 2 new seed runs: 1 of the 7 processes, the seeds take 6.
    assert (_value(extension, "--jobs"), _value(beside, "--jobs")) == ("1", "6")
    assert beside.count("--jobs") == extension.count("--jobs") == 1
    tuned = fake.calls[-1]
    assert (_value(tuned, "--methods"), _value(tuned, "--jobs")) == ("a,b,c,end", "7")


@pytest.mark.parametrize(
    ("jobs", "extension_runs", "seed_runs", "expected"),
    [(7, 1, 6, 1), (7, 9, 4, 5), (7, 12, 0, 6), (2, 1, 100, 1), (2, 100, 1, 1), (12, 5, 7, 5)],
)
def test_the_extension_takes_its_share_of_the_jobs_and_leaves_one(
    jobs, extension_runs, seed_runs, expected
):
    assert sweep_chain.jobs_for_the_extension(jobs, extension_runs, seed_runs) == expected


def test_one_job_keeps_the_stages_in_turn(tmp_path, monkeypatch):
    inside = (0.03, {0.01: 0.1, 0.03: 0.9, 0.1: 0.2})
    at_top = (0.1, {0.01: 0.1, 0.03: 0.2, 0.1: 0.3})
    fake = _FakeCompare(tmp_path, [{"a": inside, "end": at_top}, {"end": inside}, {"a": inside}])
    launch = _FakeLaunch()
    monkeypatch.setattr(sweep_chain, "_compare", fake)
    monkeypatch.setattr(sweep_chain, "_launch", launch)
    assert sweep_chain.main(["run", "--", "--out-dir", str(tmp_path)]) == 0
    assert launch.calls == []
    assert len(fake.calls) == 3


def test_a_failed_compare_beside_the_chain_fails_it(tmp_path, monkeypatch):
    inside = (0.03, {0.01: 0.1, 0.03: 0.9, 0.1: 0.2})
    at_top = (0.1, {0.01: 0.1, 0.03: 0.2, 0.1: 0.3})
    fake = _FakeCompare(tmp_path, [{"a": inside, "end": at_top}, {"end": inside}])
    monkeypatch.setattr(sweep_chain, "_compare", fake)
    monkeypatch.setattr(sweep_chain, "_launch", _FakeLaunch(status=3))
    assert sweep_chain.main(["run", "--", "--jobs", "4", "--out-dir", str(tmp_path)]) == 3
    assert len(fake.calls) == 2  # no seeds stage after a failure


def test_setting_an_option_replaces_each_of_its_forms():
    argv = ["--jobs", "8", "--methods=a,b", "--task", "lm", "--methods", "c"]
    assert sweep_chain._set(argv, {"--methods": "x", "--jobs": 2}) == [
        "--task", "lm", "--methods", "x", "--jobs", "2"
    ]  # fmt: skip


def test_the_extensions_are_bounded(tmp_path, monkeypatch):
    at_top = (0.1, {0.01: 0.1, 0.03: 0.2, 0.1: 0.3})
    fake = _FakeCompare(tmp_path, [at_top, at_top, (0.1, {0.1: 0.3})])
    monkeypatch.setattr(sweep_chain, "_compare", fake)
    argv = ["run", "--extensions", "1", "--", "--out-dir", str(tmp_path)]
    assert sweep_chain.main(argv) == 0
    assert [c[c.index("--name") + 1] for c in fake.calls] == ["run-s1", "run-s2", "run-tuned"]


def test_a_failed_stage_stops_the_chain(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_chain, "_compare", lambda argv: calls.append(argv) or 2)
    assert sweep_chain.main(["run", "--", "--out-dir", str(tmp_path)]) == 2
    assert len(calls) == 1


@pytest.mark.parametrize("option", ["--lr=0.1", "--seeds", "--name", "--lr-sweep-around=1"])
def test_options_the_chain_sets_are_refused(option, capsys):
    with pytest.raises(SystemExit):
        sweep_chain.main(["run", "--", option, "3"])
    assert "set by the chain" in capsys.readouterr().err


def test_the_compare_arguments_must_follow_a_double_dash(capsys):
    with pytest.raises(SystemExit):
        sweep_chain.main(["run", "--task", "synthetic"])
    assert "after --" in capsys.readouterr().err


def test_a_real_chain_on_the_synthetic_task(tmp_path):
    argv = ["syn", "--around=0,1", "--seeds", "2", "--", "--task", "synthetic", "--variants",
            "deterministic", "--methods", "lora-sgd", "--steps", "3", "--no-plot",
            "--out-dir", str(tmp_path)]  # fmt: skip
    assert sweep_chain.main(argv) == 0
    tuned = json.loads((tmp_path / "syn-tuned-summary.json").read_text())
    assert not (tmp_path / "syn-s1-seeds-summary.json").exists()  # one job: nothing beside
    entry = tuned["variants"]["deterministic"]["methods"]["lora-sgd"]
    assert entry["seeds"] == [0, 1]
    last = sorted(tmp_path.glob("syn-s*-summary.json"))[-1]
    chosen = json.loads(last.read_text())["variants"]["deterministic"]["methods"]["lora-sgd"]
    assert entry["lr"] == chosen["lr"]


def test_a_compare_beside_the_chain_runs_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # benchmarks/ is not importable from here by itself
    argv = ["--task", "synthetic", "--variants", "deterministic", "--methods", "lora-sgd",
            "--steps", "2", "--no-plot", "--out-dir", "out", "--name", "beside"]  # fmt: skip
    assert sweep_chain._launch(argv).wait() == 0
    assert (tmp_path / "out" / "beside-summary.json").exists()
