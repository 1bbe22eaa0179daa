"""The comm_volume benchmark quick run: measured all-reduce bytes equal the documented formulas."""

from __future__ import annotations

from tests.utils import quick_suite_record


def test_measured_bytes_equal_the_formulas(tmp_path):
    record = quick_suite_record("comm_volume", tmp_path, "gloo-cpu.json")
    for row in record["results"]:
        measured = row["optimizer_bytes_per_step"] or row["ddp_bytes_per_step"]
        assert measured == row["formula_bytes_per_step"], row
        if row.get("factor_grads") is False:
            assert row["ddp_bytes_per_step"] == 0, row  # DDP has no LoRA .grad to average
