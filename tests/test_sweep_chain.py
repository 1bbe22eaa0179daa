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
    """Records each stage's arguments and writes the summary it names, choosing from a script."""

    def __init__(self, out_dir, choices):
        self.out_dir, self.choices, self.calls = out_dir, list(choices), []

    def __call__(self, argv):
        self.calls.append(argv)
        name = argv[argv.index("--name") + 1]
        chosen, points = self.choices.pop(0)
        summary = _summary({"m": (chosen, points)})
        (self.out_dir / f"{name}-summary.json").write_text(json.dumps(summary))
        return 0


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
    given = ["--task", "glue", "--out-dir", str(tmp_path), "--lr-from", "first.json"]
    assert sweep_chain.main(["run", "--around=-2,-1,0", "--seeds", "4", "--", *given]) == 0

    names = [call[call.index("--name") + 1] for call in fake.calls]
    assert names == ["run-s1", "run-s2", "run-s3", "run-tuned"]
    first, *later = fake.calls
    assert "--lr-sweep-around=-2,-1,0" in first
    assert first[first.index("--lr-from") + 1] == "first.json"  # the user's rates start it
    for call, source in zip(later, ["run-s1", "run-s2", "run-s3"], strict=True):
        assert call.count("--lr-from") == 1  # later stages read only the chain's own summary
        assert call[call.index("--lr-from") + 1] == str(tmp_path / f"{source}-summary.json")
    assert "--lr-sweep-around=-1,0,1" in later[0]
    assert later[-1][later[-1].index("--seeds") + 1] == "4"


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
    entry = tuned["variants"]["deterministic"]["methods"]["lora-sgd"]
    assert entry["seeds"] == [0, 1]
    last = sorted(tmp_path.glob("syn-s*-summary.json"))[-1]
    chosen = json.loads(last.read_text())["variants"]["deterministic"]["methods"]["lora-sgd"]
    assert entry["lr"] == chosen["lr"]
