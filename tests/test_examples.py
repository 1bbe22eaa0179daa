"""The examples in examples/ run as written and their losses go down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
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


def _torchrun(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` on two CPU processes under torchrun (gloo).

    A rank killed by a signal (gloo aborts a process whose peer closed a connection under it,
    a race in the library's teardown that lorsum cannot reach) is retried once, with a warning
    that keeps the first attempt's messages; a second crash, an error exit or a wrong result
    fails the test.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a free port of its own, so that two runs at once (two test sessions on one
    # machine) do not meet on torchrun's default port 29500.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(EXAMPLES / script)]  # fmt: skip
    for attempt in (1, 2):
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=300, check=False, env=env
        )
        killed = "Signal " in result.stderr and "received by PID" in result.stderr
        if result.returncode == 0 or not killed or attempt == 2:
            break
        warnings.warn(f"torchrun {script}: a rank was killed by a signal; retrying once.\n"
                      f"{_ranks_messages(result.stderr)}", stacklevel=2)  # fmt: skip
    assert result.returncode == 0, _ranks_messages(result.stderr)
    return result


def _ranks_messages(stderr: str) -> str:
    """The ranks' own messages first (torchrun's summary, printed last, only names the signal)."""
    return f"{stderr[:3000]}\n[...]\n{stderr[-1500:]}" if len(stderr) > 4500 else stderr


def test_torchrun_example_trains_two_identical_ranks():
    result = _torchrun("torchrun_lorsum.py")
    losses = [float(v) for v in re.findall(r"loss\s+([0-9.]+)", result.stdout)]
    assert losses[-1] < 0.5 * losses[0]
    assert "ranks hold identical factors: True" in result.stdout


def test_accelerate_example_on_two_processes_matches_one_process():
    # Under torchrun, Accelerator(cpu=True) finds the process group (gloo) and prepare() wraps
    # the model in DDP; the exact optimizer must print the one-process run's losses.
    pytest.importorskip("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = "accelerate_lorsum.py"
    single = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True,
                            text=True, timeout=300, check=False, env=env)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    runs = [single, _torchrun(script)]
    for result in runs:
        assert "ranks hold identical factors: True" in result.stdout
    one, two = ([float(v) for v in re.findall(r"loss\s+([0-9.]+)", r.stdout)] for r in runs)
    assert one[-1] < 0.5 * one[0]
    assert two == pytest.approx(one, rel=1e-5)
