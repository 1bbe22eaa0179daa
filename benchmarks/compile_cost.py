"""What ``torch.compile`` buys a LoRA training step, with and without a gradient capture.

LoRSum's capture hooks keep Python state, so dynamo breaks the graph twice around every adapted
layer (``tests/test_compile.py`` counts the breaks): compiling can only fuse the stretches
between adapters. This suite measures how much that still helps. A stack of ``layers`` blocks
``Linear(width, width) → GELU`` with rank-``rank`` LoRA on every linear, ``rows`` input rows,
float32, trained by LoRA-AdamW, LoRSum (one sweep) and LoRSum with ``factor_grads=False``, each
eager and with ``torch.compile(model)``. For each: the median wall time of a whole training
step (forward, backward, ``optimizer.step()``) over ``repeats`` steps after ``warmup`` steps,
and the time of the first step (where compilation happens).

Run from the repository root::

    python -m benchmarks.compile_cost [--device cpu|cuda] [--quick] [--force] [--out DIR]

Results go to ``benchmarks/results/compile/<device>.json`` (atomically; skipped when the file
holds the same config hash unless ``--force``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorsum
from benchmarks import _results

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compile"
# method -> (create_optimizer method, its hyperparameters)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora-adamw": ("adamw", {"lr": 1e-3}),
    "lorsum-x1": ("lorsum", {"lr": 0.1, "num_iters": 1}),
    "lorsum-x1-no-factor-grads": ("lorsum", {"lr": 0.1, "num_iters": 1, "factor_grads": False}),
}


def make_config(device: str, quick: bool) -> dict[str, Any]:
    size = (
        {"layers": 2, "width": 64, "rank": 4, "rows": 64, "warmup": 2, "repeats": 2}
        if quick
        else {"layers": 4, "width": 1024, "rank": 16, "rows": 2048, "warmup": 3, "repeats": 20}
    )
    return {"device": device, "dtype": "float32", "methods": list(METHODS), **size}


def _model(config: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    width = config["width"]
    blocks = [m for _ in range(config["layers"]) for m in (nn.Linear(width, width), nn.GELU())]
    model = nn.Sequential(*blocks).to(config["device"])
    lorsum.add_lora(model, [str(2 * i) for i in range(config["layers"])], rank=config["rank"])
    with torch.no_grad():
        for pair in lorsum.find_lora_pairs(model):
            pair.B.normal_(std=0.01)  # PEFT's B = 0 would make the first steps special
    return model


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(config: dict[str, Any], method: str, compiled: bool) -> dict[str, Any]:
    """First-step and median step times of one method, eager or compiled."""
    device = config["device"]
    name, hparams = METHODS[method]
    model = _model(config)
    opt = lorsum.create_optimizer(model, name, **hparams)
    torch._dynamo.reset()  # every compiled measurement pays its own compilation
    forward = torch.compile(model) if compiled else model
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(config["rows"], config["width"], generator=generator).to(device)
    y = torch.randn(config["rows"], config["width"], generator=generator).to(device)
    times = []
    for _ in range(config["warmup"] + config["repeats"]):
        _synchronize(device)
        start = time.perf_counter()
        (forward(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    capture = getattr(opt, "capture", None)
    if capture is not None:
        capture.remove()
    timed = times[config["warmup"] :]
    return {
        "method": method,
        "compiled": compiled,
        "first_step_s": times[0],
        "step_time_s": _results.time_stats(timed),
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    median = {(r["method"], r["compiled"]): r["step_time_s"]["median_s"] for r in results}
    out: dict[str, Any] = {"compiled_over_eager": {}, "over_lora_adamw_eager": {}}
    base = median.get(("lora-adamw", False))
    for (method, compiled), value in median.items():
        if compiled and (method, False) in median:
            out["compiled_over_eager"][method] = value / median[method, False]
        if base:
            out["over_lora_adamw_eager"][f"{method}{' (compiled)' if compiled else ''}"] = (
                value / base
            )
    return out


def format_table(record: dict[str, Any]) -> str:
    rows = []
    for r in record["results"]:
        median = r["step_time_s"]["median_s"]
        eager = next(
            x["step_time_s"]["median_s"]
            for x in record["results"]
            if x["method"] == r["method"] and not x["compiled"]
        )
        rows.append(
            [
                r["method"],
                "compiled" if r["compiled"] else "eager",
                f"{1e3 * median:,.1f}",
                f"{median / eager:.2f}",
                f"{r['first_step_s']:.1f}",
            ]
        )
    headers = ["method", "mode", "step, median (ms)", "/ eager", "first step (s)"]
    return _results.markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compile_cost",
        description="Training-step time with and without torch.compile, per method.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the tests)")
    parser.add_argument("--force", action="store_true", help="re-run a stored result")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    config = make_config(args.device, args.quick)
    path = args.out / f"{args.device}{'-quick' if args.quick else ''}.json"
    record = None if args.force else _results.load_current(path, config)
    if record is None:
        start = time.perf_counter()
        results = [measure(config, m, c) for m in METHODS for c in (False, True)]
        record = _results.make_record(
            suite="compile_cost", part="compile", config=config, device=args.device,
            dtype="float32", seeds=[0], wall_time_s=time.perf_counter() - start,
            results=results, summary=summarize(results),
            notes={"threads": str(torch.get_num_threads())},
        )  # fmt: skip
        _results.write_json_atomic(path, record)
    print(format_table(record))
    medians = [r["step_time_s"]["median_s"] for r in record["results"]]
    print(f"\nmedian of medians {statistics.median(medians) * 1e3:.1f} ms; results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
