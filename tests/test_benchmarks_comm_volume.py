"""The comm_volume benchmark quick run: measured all-reduce bytes equal the documented formulas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_measured_bytes_equal_the_formulas(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.comm_volume", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "gloo-cpu.json").read_text())
    for row in record["results"]:
        measured = row["optimizer_bytes_per_step"] or row["ddp_bytes_per_step"]
        assert measured == row["formula_bytes_per_step"], row
        if row.get("factor_grads") is False:
            assert row["ddp_bytes_per_step"] == 0, row  # DDP has no LoRA .grad to average
