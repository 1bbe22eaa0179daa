"""``benchmarks.import_device_runs``: a lease's run files, extracted with their real commit."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from benchmarks import _cli
from benchmarks.import_device_runs import import_runs, main

CONFIG = {"task": "glue", "variant": "rte", "method": "lora-adamw", "steps": 234, "lr": 0.001,
          "seed": 0, "device": "cuda", "data_dir": "/tmp/lo/data", "size": "full"}  # fmt: skip
RUN = "compare-full/glue-rte/lora-adamw/lr0.001-seed0.json"


def _record(**config):
    return {
        "suite": "compare",
        "config": {**CONFIG, **config},
        "environment": {"git": {"sha": "stale", "dirty": True}},
        "results": {"final": 0.5},
    }


def _archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            raw = data if isinstance(data, bytes) else json.dumps(data).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_runs_come_back_with_the_lease_s_commit_and_summaries_as_they_are(tmp_path):
    summary = {"task": "glue", "variants": {}}
    archive = _archive(tmp_path / "runs.tgz", {f"./{RUN}": _record(), "x-summary.json": summary})
    results = tmp_path / "results"
    written = import_runs(archive, sha="abc123", card="NVIDIA H100", results=results)
    assert sorted(p.relative_to(results).as_posix() for p in written) == [RUN, "x-summary.json"]
    git = json.loads((results / RUN).read_text())["environment"]["git"]
    assert git["sha"] == "abc123"
    assert git["dirty"] is False
    assert "NVIDIA H100" in git["note"]
    assert json.loads((results / "x-summary.json").read_text()) == summary


def test_the_same_run_mounted_elsewhere_is_replaced_another_config_is_not(tmp_path):
    results = tmp_path / "results"
    stored = results / RUN
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps(_record(data_dir="../shared/data")))
    import_runs(_archive(tmp_path / "a.tgz", {RUN: _record()}), sha="s", card="c", results=results)

    stored.write_text(json.dumps(_record(steps=100)))
    other = _archive(tmp_path / "b.tgz", {RUN: _record(), "new-summary.json": {}})
    with pytest.raises(_cli.UserError, match="steps: stored 100, planned 234"):
        import_runs(other, sha="s", card="c", results=results)
    assert json.loads(stored.read_text())["config"]["steps"] == 100
    assert not (results / "new-summary.json").exists()  # nothing written when one is refused
    import_runs(other, sha="s", card="c", results=results, force=True)
    assert json.loads(stored.read_text())["config"]["steps"] == 234


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [("../escape.json", {}, "leave"), ("/abs.json", {}, "leave"), ("bad.json", b"{", "not JSON")],
)
def test_bad_members_are_refused_by_name(tmp_path, capsys, name, data, match):
    archive = _archive(tmp_path / "runs.tgz", {name: data})
    results = tmp_path / "results"
    assert main([str(archive), "--sha", "s", "--card", "c", "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert match in err[0]
    assert not results.exists()
