"""The examples in examples/ run as written and their losses go down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str) -> list[float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return [float(v) for v in re.findall(r"loss\s+([0-9.]+)", result.stdout)]


def test_plain_pytorch_example_trains():
    losses = _run("plain_pytorch.py")
    assert losses[-1] < 0.5 * losses[0]


def test_peft_example_trains():
    pytest.importorskip("peft")
    losses = _run("peft_lorsum.py")
    assert losses[-1] < losses[0]


def test_torchrun_example_trains_two_identical_ranks():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        # --standalone: a free port of its own, so that two runs at once (two test sessions on
        # one machine) do not meet on torchrun's default port 29500.
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(EXAMPLES / "torchrun_lorsum.py")],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(v) for v in re.findall(r"loss\s+([0-9.]+)", result.stdout)]
    assert losses[-1] < 0.5 * losses[0]
    assert "ranks hold identical factors: True" in result.stdout


def test_accelerate_example_on_two_processes_matches_one_process():
    # Under torchrun, Accelerator(cpu=True) finds the process group (gloo) and prepare() wraps
    # the model in DDP; the exact optimizer must print the one-process run's losses.
    pytest.importorskip("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(EXAMPLES / "accelerate_lorsum.py")
    runs = [
        subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env)
        for command in (
            [sys.executable, script],
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", script],
        )
    ]  # fmt: skip
    for result in runs:
        assert result.returncode == 0, result.stderr[-2000:]
        assert "ranks hold identical factors: True" in result.stdout
    one, two = ([float(v) for v in re.findall(r"loss\s+([0-9.]+)", r.stdout)] for r in runs)
    assert one[-1] < 0.5 * one[0]
    assert two == pytest.approx(one, rel=1e-5)
