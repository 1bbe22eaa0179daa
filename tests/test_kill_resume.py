"""``kill -9`` in the middle of a sweep loses nothing: finished runs stay, the partial is redone.

A real ``lorsum compare`` process is killed with SIGKILL as soon as its first run file appears
(no handler runs, no file is closed); a rerun must keep every finished file byte for byte, redo
only what is missing, and ignore the debris a killed writer can leave (a temp file, a truncated
record from a non-atomic copy).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Four runs of a few seconds each on 2 cores: the kill lands seconds before the second ends.
SWEEP = ["compare", "--variants", "deterministic", "--methods", "lora-sgd,lorsum-x1",
         "--seeds", "2", "--steps", "400", "--no-plot"]  # fmt: skip


def _compare(out_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lorsum.cli", *SWEEP, "--out-dir", str(out_dir), *extra],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _run_files(out_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in out_dir.glob("synthetic-*/*/*.json")}


def test_a_sweep_killed_with_sigkill_keeps_its_finished_runs_and_redoes_the_rest(tmp_path):
    process = _compare(tmp_path)
    deadline = time.monotonic() + 240
    while not _run_files(tmp_path):
        assert process.poll() is None, "the sweep ended before any run could be interrupted"
        assert time.monotonic() < deadline, "no run finished within 240 s"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = _run_files(tmp_path)
    assert 1 <= len(finished) < 4, "the kill must land mid-sweep"
    for content in finished.values():
        json.loads(content)  # every file that exists is a complete record, never a torn one

    # What a killed writer, or a copy that was not atomic, can leave behind.
    some_run = next(iter(finished))
    (some_run.parent / f".{some_run.name}.abc123.tmp").write_text('{"config": ')
    runs = [(method, lr, seed) for method, lr in (("lora-sgd", 0.01), ("lorsum-x1", 0.5))
            for seed in (0, 1)]  # fmt: skip
    expected = [
        tmp_path / "synthetic-deterministic" / m / f"lr{lr}-seed{s}-steps400.json"
        for m, lr, s in runs
    ]
    torn = next(path for path in expected if path not in finished)
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_text('{"config_hash": "')

    rerun = _compare(tmp_path)
    assert rerun.wait(timeout=300) == 0
    after = _run_files(tmp_path)
    assert sorted(after) == sorted(expected)
    for path, content in finished.items():
        assert after[path] == content, f"{path.name} was redone or changed"
    summary = json.loads((tmp_path / "synthetic-summary.json").read_text())
    methods = summary["variants"]["deterministic"]["methods"]
    assert sorted(methods) == ["lora-sgd", "lorsum-x1"]
    assert all(entry["seeds"] == [0, 1] for entry in methods.values())
