"""Fuzzed optimizer steps: over shapes, ranks, dtypes, damping, sweeps and learning rates, every
guarded optimizer keeps its factors' shapes and dtypes, writes only finite values, and with
``lr = 0`` leaves the adapter's product ``s B A`` unchanged. A fixed, derandomised subset runs by
default; ``-m slow`` runs 5,000 examples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorsum
from tests.utils import randn

# method -> the hyperparameters the fuzz draws (damping and sweeps where the method has them)
_USES = {
    "lorsum": ("damping", "num_iters", "momentum"),
    "scaled_lorsum": ("damping", "num_iters"),
    "svdlora": ("momentum",),
    "precond_sgd": ("damping", "momentum"),
    "precond_adamw": ("damping",),
    "lora_pro": (),
}

cases = st.fixed_dictionaries(
    {
        "method": st.sampled_from(sorted(_USES)),
        "m": st.integers(1, 16),
        "n": st.integers(1, 16),
        "r": st.integers(1, 8),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "damping": st.sampled_from([0.0, 1e-8, 1e-3, 1.0]),
        "num_iters": st.integers(0, 3),
        "momentum": st.sampled_from([0.0, 0.5, 0.9]),
        "lr": st.sampled_from([0.0, 1e-3, 0.1, 10.0]),
        "steps": st.integers(1, 3),
        "seed": st.integers(0, 2**16),
    }
)


def _check(case: dict) -> None:
    m, n, dtype, seed = case["m"], case["n"], case["dtype"], case["seed"]
    r = min(case["r"], m, n)
    if case["method"] == "precond_sgd" and case["damping"] == 0.0:
        case = {**case, "damping": 1e-8}  # δ = 0 with a rank-deficient B is a singular Gram
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m, bias=False)).to(dtype)
    (pair,) = lorsum.add_lora(model, ["0"], rank=r)
    with torch.no_grad():
        pair.B.copy_(0.3 * randn(m, r, seed=seed, dtype=dtype))
    hparams = {key: case[key] for key in _USES[case["method"]]}
    if case["method"] == "scaled_lorsum":
        hparams["metric"] = "shampoo"
    opt = lorsum.create_optimizer(model, case["method"], lr=case["lr"], **hparams)
    x, y = randn(5, n, seed=seed + 1, dtype=dtype), randn(5, m, seed=seed + 2, dtype=dtype)
    layer = model[0]
    before = (layer.scaling * pair.B @ pair.A).detach().clone()
    for _ in range(case["steps"]):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    capture = getattr(opt, "capture", None)
    if capture is not None:
        capture.remove()
    for p, shape in ((pair.A, (r, n)), (pair.B, (m, r))):
        assert (tuple(p.shape), p.dtype) == (shape, dtype), case
        assert torch.isfinite(p).all(), case
    if case["lr"] == 0.0:
        after = (layer.scaling * pair.B @ pair.A).detach()
        tol = 1e-4 if dtype == torch.float32 else 1e-9
        err = float((after - before).norm() / before.norm().clamp_min(1e-30))
        assert err <= tol, f"lr = 0 moved B A by rel_err {err:.2e} > {tol:g}: {case}"


@settings(max_examples=60)
@given(case=cases)
def test_fuzzed_steps_stay_finite_and_keep_shapes_and_dtypes(case):
    _check(case)


@pytest.mark.slow
@settings(max_examples=5000, derandomize=False)
@given(case=cases)
def test_5000_fuzzed_steps_stay_finite_and_keep_shapes_and_dtypes(case):
    _check(case)
