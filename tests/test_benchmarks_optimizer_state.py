"""The optimizer_state benchmark's quick mode runs and measures LoRA-Pro's full-size moments."""

from __future__ import annotations

from tests.utils import quick_suite_record


def test_quick_run_records_lora_pro_s_full_size_moments(tmp_path):
    record = quick_suite_record("optimizer_state", tmp_path, "state.json")
    by_method = {r["method"]: r for r in record["results"]}
    base = by_method["lora_pro"]["base_weight_bytes_per_block"]
    # exp_avg and exp_avg_sq of every m x n weight, in float32: twice the base weights' bytes,
    # plus a few 0-d counters (step, skipped_steps).
    assert 2 * base <= by_method["lora_pro"]["state_bytes_per_block"] < 2 * base + 1024
    assert by_method["lorsum"]["state_bytes_per_block"] < base / 1000
