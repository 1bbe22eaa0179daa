"""Fuzzed optimizer steps: over shapes, ranks, dtypes, damping, sweeps and learning rates, every
guarded optimizer keeps its factors' shapes and dtypes, writes only finite values, and with
``lr = 0`` leaves the adapter's product ``s B A`` unchanged. A fixed, derandomised subset runs by
default; ``-m slow`` runs 5,000 examples. The cases and checks are ``benchmarks.reliability``'s,
which records a seeded 5,000-example run for the docs."""

from __future__ import annotations

import pytest
from benchmarks import reliability
from hypothesis import given, settings

cases = reliability.fuzz_cases()
_check = reliability.check_fuzz_case


@settings(max_examples=60)
@given(case=cases)
def test_fuzzed_steps_stay_finite_and_keep_shapes_and_dtypes(case):
    _check(case)


@pytest.mark.slow
@settings(max_examples=5000, derandomize=False)
@given(case=cases)
def test_5000_fuzzed_steps_stay_finite_and_keep_shapes_and_dtypes(case):
    _check(case)
