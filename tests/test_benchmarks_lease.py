"""``benchmarks/lease``: the GPU lease runner's scripts parse, and it refuses unknown modes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

LEASE = Path(__file__).resolve().parents[1] / "benchmarks" / "lease"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("script", sorted(p.name for p in LEASE.glob("*.sh")))
def test_the_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(LEASE / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_an_unknown_mode_prints_the_usage_and_fails():
    result = subprocess.run(["bash", str(LEASE / "lease.sh")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_the_owed_lanes_define_lane_functions():
    text = (LEASE / "lanes-owed.sh").read_text()
    lanes = [line.split("(")[0] for line in text.splitlines() if line.startswith("lane_")]
    assert lanes == ["lane_svdlora", "lane_squad", "lane_sst2", "lane_lm"]
