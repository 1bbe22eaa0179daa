"""Long runs stay accurate: LoRSum in float32 on the synthetic task (stochastic variant, its
benchmark learning rate and momentum) follows the float64 run of the same trajectory (same init,
same batches) to within 1e-3 relative in ``B A`` at every checkpoint, and the factors stay
balanced (neither norm collapses nor blows up). 2,000 steps under ``-m slow``; 200 by default.
The trajectory is ``benchmarks.reliability``'s, which records the 2,000-step run for the docs."""

from __future__ import annotations

import pytest
import torch
from benchmarks import reliability


def _check_float32_follows_float64(steps: int) -> None:
    low = reliability.soak_trajectory(torch.float32, steps)
    high = reliability.soak_trajectory(torch.float64, steps)
    for i, ((W32, ratio32), (W64, ratio64)) in enumerate(zip(low, high, strict=True)):
        err = float((W32 - W64).norm() / W64.norm())
        assert err <= 1e-3, f"step {50 * (i + 1)}: rel_err(BA_f32, BA_f64) = {err:.2e} > 1e-3"
        # Balanced: ‖B‖/‖A‖ neither collapses nor explodes, and float32 agrees with float64.
        assert 0.1 <= ratio32 <= 10.0, f"step {50 * (i + 1)}: ‖B‖/‖A‖ = {ratio32:.3g}"
        assert abs(ratio32 - ratio64) <= 1e-3 * ratio64, (ratio32, ratio64)


def test_200_float32_steps_follow_the_float64_run():
    _check_float32_follows_float64(200)


@pytest.mark.slow
def test_2000_float32_steps_follow_the_float64_run():
    # The measured figures are in benchmarks/results/reliability/reliability.json.
    _check_float32_follows_float64(2000)
