"""Reliability figures: how long LoRSum stays accurate, and how many fuzzed steps hold.

Two measurements, recorded in ``benchmarks/results/reliability/reliability.json`` for the docs:

* **soak**: LoRSum (one sweep, momentum 0.9) on the synthetic task's stochastic variant, at its
  benchmark learning rate, in float32 and in float64 from the same init and the same batches.
  Every ``every`` steps: the relative distance of the float32 adapter ``B A`` from the float64
  one, and the balance ``‖B‖_F / ‖A‖_F`` of the float32 factors. The claim (issue #8): within
  1e-3 relative over 2,000 steps, and the factors' norms neither collapse nor blow up.
* **fuzz**: Hypothesis draws optimizer steps over shapes (1..16), ranks (1..8), dtypes, damping
  (0 to 1), sweeps (0..3), momentum, learning rates (0 to 10) and step counts, for every guarded
  optimizer; each must keep its factors' shapes and dtypes, write only finite values, and with
  ``lr = 0`` leave ``s B A`` unchanged. The record counts the examples run and the failures.

The tests use the same code (``tests/test_soak.py``, ``tests/optim/test_fuzz.py``): a short
soak and a derandomised subset by default, the full lengths under ``-m slow``.

Run from the repository root::

    python -m benchmarks.reliability [--soak-steps 2000] [--fuzz-examples 5000] [--force]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorsum
from benchmarks import _cli, _results
from benchmarks.tasks import synthetic

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "reliability"
SOAK_VARIANT, SOAK_METHOD = "stochastic", "lorsum-x1"
SOAK_TOLERANCE = 1e-3  # relative, in B A, at every checkpoint
BALANCE_RANGE = (0.1, 10.0)  # allowed ‖B‖/‖A‖ of the float32 factors

# method -> the hyperparameters the fuzz draws (damping and sweeps where the method has them)
FUZZED_HYPERPARAMETERS = {
    "lorsum": ("damping", "num_iters", "momentum"),
    "scaled_lorsum": ("damping", "num_iters"),
    "svdlora": ("momentum",),
    "precond_sgd": ("damping", "momentum"),
    "precond_adamw": ("damping",),
    "lora_pro": (),
}


def fuzz_cases() -> Any:
    """The Hypothesis strategy of one fuzzed case (imported here: the docs need no Hypothesis)."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        {
            "method": st.sampled_from(sorted(FUZZED_HYPERPARAMETERS)),
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


# --- soak ---------------------------------------------------------------------------------------


def soak_trajectory(dtype: torch.dtype, steps: int, every: int = 50) -> list[tuple[Any, float]]:
    """``(B A in float64, ‖B‖_F / ‖A‖_F)`` every ``every`` steps of one run in ``dtype``."""
    problem = synthetic._problem(0, torch.device("cpu"))
    model, _ = synthetic._model(problem, dense=False)
    model = model.to(dtype)
    name, hparams = synthetic.methods(SOAK_VARIANT)[SOAK_METHOD]
    lr = synthetic.default_learning_rate(SOAK_VARIANT, SOAK_METHOD)
    opt = lorsum.create_optimizer(model, name, lr=lr, **hparams)
    inputs, targets = torch.eye(synthetic.N_IN, dtype=dtype), problem.target.T.to(dtype)
    batches = synthetic._batches(SOAK_VARIANT, 0, torch.device("cpu"))
    layer = model[0]
    out = []
    for step in range(1, steps + 1):
        rows = next(batches)
        opt.zero_grad()
        (model(inputs[rows]) - targets[rows]).square().sum().backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                B, A = layer.lora_B.weight.double(), layer.lora_A.weight.double()
                out.append((B @ A, float(B.norm() / A.norm())))
    opt.capture.remove()
    return out


def soak(steps: int, every: int = 50) -> dict[str, Any]:
    """float32 against float64 over ``steps`` steps: the distance and balance at each checkpoint."""
    low, high = (
        soak_trajectory(torch.float32, steps, every),
        soak_trajectory(torch.float64, steps, every),
    )
    points = []
    for i, ((W32, ratio32), (W64, ratio64)) in enumerate(zip(low, high, strict=True)):
        points.append(
            {
                "step": every * (i + 1),
                "rel_err": float((W32 - W64).norm() / W64.norm()),
                "balance_float32": ratio32,
                "balance_float64": ratio64,
            }
        )
    return {"steps": steps, "every": every, "points": points}


# --- fuzz ---------------------------------------------------------------------------------------


def check_fuzz_case(case: dict[str, Any]) -> None:
    """One fuzzed case: build, step; assert shapes, dtypes, finiteness and the lr = 0 fixpoint."""
    m, n, dtype, case_seed = case["m"], case["n"], case["dtype"], case["seed"]
    r = min(case["r"], m, n)
    if case["method"] == "precond_sgd" and case["damping"] == 0.0:
        case = {**case, "damping": 1e-8}  # δ = 0 with a rank-deficient B is a singular Gram
    torch.manual_seed(case_seed)
    model = nn.Sequential(nn.Linear(n, m, bias=False)).to(dtype)
    (pair,) = lorsum.add_lora(model, ["0"], rank=r)
    generator = torch.Generator().manual_seed(case_seed)
    with torch.no_grad():
        pair.B.copy_(0.3 * torch.randn(m, r, generator=generator, dtype=dtype))
    hparams = {key: case[key] for key in FUZZED_HYPERPARAMETERS[case["method"]]}
    if case["method"] == "scaled_lorsum":
        hparams["metric"] = "shampoo"
    opt = lorsum.create_optimizer(model, case["method"], lr=case["lr"], **hparams)
    x = torch.randn(5, n, generator=generator, dtype=dtype)
    y = torch.randn(5, m, generator=generator, dtype=dtype)
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


def fuzz(examples: int, random_seed: int = 0) -> dict[str, Any]:
    """Run ``examples`` fuzzed cases (seeded, no example database); count runs and failures."""
    from hypothesis import HealthCheck, given, seed, settings

    counts = {"run": 0}
    by_method: dict[str, int] = {}

    @seed(random_seed)
    @settings(
        max_examples=examples, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
    @given(case=fuzz_cases())
    def run(case: dict[str, Any]) -> None:
        counts["run"] += 1
        by_method[case["method"]] = by_method.get(case["method"], 0) + 1
        check_fuzz_case(case)

    failure = None
    try:
        run()
    except AssertionError as error:  # Hypothesis re-raises the shrunk failing example
        failure = str(error)
    return {
        "max_examples": examples,
        "seed": random_seed,
        "examples_run": counts["run"],
        "examples_by_method": dict(sorted(by_method.items())),
        "failures": 0 if failure is None else 1,
        "failure": failure,
    }


# --- the suite ----------------------------------------------------------------------------------


def summarize(soak_result: dict[str, Any], fuzz_result: dict[str, Any]) -> dict[str, Any]:
    errors = [p["rel_err"] for p in soak_result["points"]]
    balances = [p["balance_float32"] for p in soak_result["points"]]
    return {
        "soak_steps": soak_result["steps"],
        "soak_max_rel_err": max(errors),
        "soak_final_rel_err": errors[-1],
        "soak_balance_min": min(balances),
        "soak_balance_max": max(balances),
        "soak_within_tolerance": max(errors) <= SOAK_TOLERANCE,
        "soak_balanced": BALANCE_RANGE[0] <= min(balances) and max(balances) <= BALANCE_RANGE[1],
        "fuzz_examples": fuzz_result["examples_run"],
        "fuzz_failures": fuzz_result["failures"],
    }


def format_table(record: dict[str, Any]) -> str:
    """The record as a markdown table (the docs' Reliability page and ``--summarize-only``)."""
    s = record["summary"]
    max_err = f"{s['soak_max_rel_err']:.2e} (limit {SOAK_TOLERANCE:g})"
    balance = f"{s['soak_balance_min']:.2f} to {s['soak_balance_max']:.2f}"
    rows = [
        ["float32 soak, steps held", f"{s['soak_steps']:,}"],
        ["max rel. distance of B A from float64", max_err],
        ["rel. distance after the last step", f"{s['soak_final_rel_err']:.2e}"],
        ["‖B‖/‖A‖ over the run (float32)", balance],
        ["fuzzed optimizer steps (examples)", f"{s['fuzz_examples']:,}"],
        ["fuzz failures", str(s["fuzz_failures"])],
    ]  # fmt: skip
    return _results.markdown_table(["measure", "value"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reliability",
        description="Soak LoRSum in float32 against float64 and fuzz every guarded optimizer.",
    )
    parser.add_argument("--soak-steps", type=_cli.positive_int, default=2000)
    parser.add_argument("--fuzz-examples", type=_cli.positive_int, default=5000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="re-run a stored result")
    args = parser.parse_args(argv)
    config = {"soak": {"variant": SOAK_VARIANT, "method": SOAK_METHOD, "steps": args.soak_steps},
              "fuzz": {"examples": args.fuzz_examples, "seed": 0}}  # fmt: skip
    path = args.out / "reliability.json"
    record = None if args.force else _results.load_current(path, config)
    if record is None:
        start = time.perf_counter()
        soak_result = soak(args.soak_steps)
        fuzz_result = fuzz(args.fuzz_examples)
        record = _results.make_record(
            suite="reliability", part="reliability", config=config, device="cpu",
            dtype="float32/float64", seeds=[0], wall_time_s=time.perf_counter() - start,
            results={"soak": soak_result, "fuzz": fuzz_result},
            summary=summarize(soak_result, fuzz_result),
        )  # fmt: skip
        _results.write_json_atomic(path, record)
    print(format_table(record))
    print(f"\nresults in {path}")
    failed = record["summary"]["fuzz_failures"] or not record["summary"]["soak_within_tolerance"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
