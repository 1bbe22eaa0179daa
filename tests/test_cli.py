"""The ``lorsum`` command line: the default comparison, its JSON output, and clean user errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorsum.cli import main


def test_compare_prints_every_method_and_writes_json(tmp_path, capsys):
    out = tmp_path / "result.json"
    status = main(
        ["compare", "--steps", "3", "--seeds", "1", "--sweeps", "0,1,4", "--output", str(out)]
    )
    assert status == 0
    printed = capsys.readouterr().out
    for method in ("LoRSum x0", "LoRSum x1", "LoRSum x4", "SVDLoRA"):
        assert method in printed
    payload = json.loads(out.read_text())
    curves = payload["excess_loss"]
    assert set(curves) == {"LoRSum x0", "LoRSum x1", "LoRSum x4", "SVDLoRA"}
    assert len(curves["SVDLoRA"][0]) == 3
    # The exact projection is the best rank-8 point after each step; more sweeps come closer.
    assert curves["SVDLoRA"][0][0] <= curves["LoRSum x4"][0][0] <= curves["LoRSum x1"][0][0]
    assert min(min(c[0]) for c in curves.values()) >= -1e-6  # loss - f* >= 0 for rank-8 W


def test_console_script_runs_the_default_help():
    result = subprocess.run(
        [sys.executable, "-m", "lorsum.cli", "compare", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "--sweeps" in result.stdout


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["compare", "--sweeps", "1,-2"], "expected integers >= 0"),
        (["compare", "--steps", "0"], "must be a positive integer"),
        (["compare", "--lr", "-1"], "must be a positive number"),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_clear_line(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "compare" in capsys.readouterr().out
