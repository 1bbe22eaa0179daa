"""``benchmarks.throughput_probe``: processes training at once, each counted, on the CPU here."""

from __future__ import annotations

import json

import pytest
from benchmarks import throughput_probe

pytest.importorskip("transformers")
pytest.importorskip("peft")

TINY = ["--device", "cpu", "--seconds", "0.5", "--batch", "1", "--seq-len", "8", "--warmup", "1"]


def test_two_processes_train_at_once_and_each_is_counted(tmp_path, capsys):
    out = tmp_path / "probe.json"
    argv = [*TINY, "--procs", "2", "--method", "lorsum-x1", "--label", "cpu", "--out", str(out)]
    assert throughput_probe.main(argv) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["procs"] == 2
    assert len(result["steps_per_s"]) == 2
    assert all(rate > 0 for rate in result["steps_per_s"])
    assert result["total_steps_per_s"] == pytest.approx(sum(result["steps_per_s"]))
    assert "2 processes:" in capsys.readouterr().out


def test_a_failing_process_is_reported_not_waited_for():
    with pytest.raises(RuntimeError, match="1 of 1 probe processes failed"):
        throughput_probe.measure(
            1, seconds=0.5, device="cpu", batch=1, seq_len=0, warmup=1, method="lora-adamw"
        )


@pytest.mark.parametrize("bad", [["--procs", "0"], ["--procs", "a"], ["--seconds", "0"]])
def test_bad_options_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        throughput_probe.main([*TINY, *bad])
    assert "error" in capsys.readouterr().err
