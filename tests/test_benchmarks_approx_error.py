"""The approx_error benchmark's quick mode runs end to end and writes sane result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = {
    "suite",
    "part",
    "config",
    "config_hash",
    "environment",
    "device",
    "dtype",
    "seeds",
    "wall_time_s",
    "results",
    "summary",
}


def _run_quick(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.approx_error", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _mean_excess(quality: dict[str, Any], k: int) -> float:
    (entry,) = (
        e
        for e in quality["results"]
        if e["spectrum"] == "random" and e["damping"] == 0.0 and e["k"] == k
    )
    return entry["excess_residual"]["mean"]


def test_quick_run_writes_results_and_skips_when_current(tmp_path: Path) -> None:
    done = _run_quick(tmp_path)
    assert done.returncode == 0, done.stderr

    quality = json.loads((tmp_path / "quality.json").read_text(encoding="utf-8"))
    cost = json.loads((tmp_path / "cost.json").read_text(encoding="utf-8"))
    for record, part in ((quality, "quality"), (cost, "cost")):
        assert record.keys() >= RECORD_KEYS
        assert (record["suite"], record["part"]) == ("approx_error", part)
        assert {"git", "versions", "cpu_model", "torch_num_threads"} <= record["environment"].keys()

    # Sixteen undamped sweeps reach the truncated SVD; the one-pass Jacobi step does not.
    assert _mean_excess(quality, 16) < 1e-6
    assert _mean_excess(quality, 0) > _mean_excess(quality, 16)

    for entry in cost["results"]:
        assert entry["speedup"] > 0
        for method in ("lorsum", "dense_svd_projection"):
            assert entry["time"][method]["median_s"] > 0
            assert entry["memory"][method]["peak_extra_bytes"] >= 0

    # Same config hash: the second run reuses both files instead of measuring again.
    mtimes = [(tmp_path / name).stat().st_mtime_ns for name in ("quality.json", "cost.json")]
    again = _run_quick(tmp_path)
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stderr
    assert [(tmp_path / n).stat().st_mtime_ns for n in ("quality.json", "cost.json")] == mtimes
