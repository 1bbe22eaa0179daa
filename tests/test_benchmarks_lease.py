"""``benchmarks/lease``: the GPU lease runner's scripts parse, and it refuses unknown modes."""

from __future__ import annotations

import os
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


def _owed_commands() -> list[tuple[str, list[str]]]:
    """Every ``compare`` and ``chain`` call of ``lanes-owed.sh``, recorded by stubs in bash."""
    # One printf per call, so that the lines of lanes that run calls in the background (`&`)
    # do not interleave.
    script = (
        'compare() { local IFS=$\'\\x1f\'; printf "compare\\x1f%s\\n" "$*"; }\n'
        'chain() { local IFS=$\'\\x1f\'; printf "chain\\x1f%s\\n" "$*"; }\n'
        f'source "{LEASE / "lanes-owed.sh"}"\n'
        'for lane in $(declare -F | grep -o "lane_[A-Za-z0-9_]*"); do "$lane"; done\n'
    )
    env = {**os.environ, "RESULTS": "/results", "DATA": "/data"}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    calls = []
    for line in result.stdout.splitlines():
        kind, *argv = line.split("\x1f")
        calls.append((kind, argv))
    return calls


def test_every_owed_lane_runs_known_tasks_variants_and_methods():
    from benchmarks import compare
    from benchmarks.tasks import TASKS

    calls = _owed_commands()
    assert calls, "lanes-owed.sh defines no lane that calls compare or chain"
    for kind, argv in calls:
        if kind == "chain":
            assert "--" in argv, f"chain without `--` before the compare arguments: {argv}"
            argv = argv[argv.index("--") + 1 :]
        args = compare.build_parser().parse_args(argv)
        task = TASKS[args.task]
        for variant in args.variants or task.VARIANTS:
            assert variant in task.VARIANTS, f"{args.task} has no variant {variant!r}"
            unknown = set(args.methods or ()) - set(task.methods(variant))
            assert not unknown, f"{args.task}/{variant} has no methods {sorted(unknown)}"
