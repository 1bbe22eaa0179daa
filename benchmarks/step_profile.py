"""Where the time of a whole training step goes: the host's launches or the device's kernels.

``benchmarks.step_cost`` times the end-to-end steps; this suite explains them. For one of its
models (``e2e-smollm2`` by default: SmolLM2-135M, 210 rank-16 adapters, 8 × 512 tokens, bf16
autocast), each method runs in its own fresh process: ``warmup`` training steps, then
``steps`` more under ``torch.profiler``. From the trace, per step and per phase (the forward and
backward together, then ``optimizer.step()``):

* the wall time (device-synchronised at the end of each phase);
* the device's busy time, the summed durations of the kernels the phase launched (GPU only);
* the number of kernels (GPU) and of operators dispatched from Python (every device).

A phase whose busy time is a small part of its wall time is bound by the host: each operator
and each Python hook costs host time whatever the size of its kernel, and the device waits for
the next launch. That is what decides LoRSum's end-to-end ratio on a model with many small
adapters, where the optimizer's flops are negligible (``docs/performance.md``).

Run from the repository root::

    python -m benchmarks.step_profile [--device cpu|cuda] [--methods a,b] [--quick] [--out DIR]

Results go to ``benchmarks/results/step_profile/<part>-<device>.json`` (atomically).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import _results, step_cost

SUITE = "step_profile"
DEFAULT_OUT = _results.REPO_ROOT / "benchmarks" / "results" / SUITE
DEFAULT_METHODS = (
    "lora-adamw", "frozen-adapters", "lorsum-x1-nomom", "lorsum-x1-nomom-no-factor-grads",
    "lorsum-x1-nomom-in-backward", "lorsum-x1-nomom-in-backward-bucketed", "lorsum-x1",
)  # fmt: skip
PHASES = ("forward_backward", "optimizer_step")
TOP = 12  # kernels and operators listed per phase
KERNEL_NAME_CHARS = 160  # template-heavy kernel names are cut to this


def profile_method(method: str, config: dict[str, Any]) -> dict[str, Any]:
    """Profile ``config["steps"]`` training steps of ``method`` after ``config["warmup"]``."""
    device = torch.device(config["device"])
    torch.manual_seed(0)
    optimizers, loss_fn = step_cost._E2E_MODELS[config["part"]](method, config, device)

    def train_step(walls: dict[str, list[float]] | None = None) -> None:
        for phase in PHASES:
            start = time.perf_counter()
            with record_function(phase):
                if phase == "forward_backward":
                    optimizers.zero_grad()
                    loss_fn().backward()
                else:
                    optimizers.step()
                step_cost._synchronize(device)
            if walls is not None:
                walls[phase].append(time.perf_counter() - start)

    for _ in range(config["warmup"]):
        train_step()
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    walls: dict[str, list[float]] = {phase: [] for phase in PHASES}
    with profile(activities=activities) as trace:
        for _ in range(config["steps"]):
            train_step(walls)
    optimizers.close()
    counts = _phase_counts(trace.events(), config["steps"])
    return {
        "method": method,
        **{phase: {"wall_s": statistics.median(walls[phase]), **counts[phase]} for phase in PHASES},
    }


def _phase_counts(events: Any, steps: int) -> dict[str, dict[str, float | None]]:
    """Per phase and step: top-level operators, kernels, and the kernels' busy time.

    An event belongs to the phase whose range contains its start: each phase ends with a device
    synchronisation inside its range, so its kernels (and the autograd thread's operators)
    finish before the range does. A top-level operator is an ``aten::`` call not made by
    another one: what Python, a hook or the autograd engine dispatched.
    """
    spans = {phase: [e.time_range for e in events if e.name == phase] for phase in PHASES}

    def phase_of(event: Any) -> str | None:
        begin = event.time_range.start
        for phase, ranges in spans.items():
            if any(r.start <= begin <= r.end for r in ranges):
                return phase
        return None

    operators: dict[str, Counter[str]] = {phase: Counter() for phase in PHASES}
    kernels: dict[str, list[float]] = {phase: [] for phase in PHASES}
    kernel_time: dict[str, Counter[str]] = {phase: Counter() for phase in PHASES}
    kernel_count: dict[str, Counter[str]] = {phase: Counter() for phase in PHASES}
    found_kernels = False
    for event in events:
        if _is_device_kernel(event):
            found_kernels = True
            if (phase := phase_of(event)) is not None:
                kernels[phase].append(event.time_range.elapsed_us())
                name = event.name[:KERNEL_NAME_CHARS]
                kernel_time[phase][name] += event.time_range.elapsed_us()
                kernel_count[phase][name] += 1
        elif event.name.startswith("aten::"):
            parent = getattr(event, "cpu_parent", None)
            if (parent is None or not parent.name.startswith("aten::")) and (
                phase := phase_of(event)
            ) is not None:
                operators[phase][event.name] += 1
    return {
        phase: {
            "operators": operators[phase].total() / steps,
            "kernels": len(kernels[phase]) / steps if found_kernels else None,
            "device_busy_s": sum(kernels[phase]) / 1e6 / steps if found_kernels else None,
            # What the time and the launches are spent on: the kernels that take the most
            # device time, and the operators dispatched most often (each costs host time).
            "top_kernels": [
                {
                    "name": name,
                    "per_step": kernel_count[phase][name] / steps,
                    "ms": us / 1e3 / steps,
                }
                for name, us in kernel_time[phase].most_common(TOP)
            ],
            "top_operators": [
                {"name": name, "per_step": n / steps}
                for name, n in operators[phase].most_common(TOP)
            ],
        }
        for phase in PHASES
    }


def _is_device_kernel(event: Any) -> bool:
    """A kernel on the device's timeline. ``record_function`` ranges (the phases, the optimizer's
    ``Optimizer.step#...``) appear there too, as user annotations spanning their kernels and the
    gaps between them: counted as busy time, they would hide how idle the device is."""
    device_type = getattr(event, "device_type", None)
    return (
        device_type == torch.autograd.DeviceType.CUDA
        and not getattr(event, "is_user_annotation", False)
        and not event.name.startswith("cuda")
    )


def run(config: dict[str, Any], progress: Path | None = None) -> dict[str, Any]:
    """Profile every method. ``progress``: where the record so far is written after each method
    (marked partial), so that a run cut short by a time limit keeps what it measured."""
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for method in config["methods"]:
        print(f"{SUITE}: {method} (own process)", file=sys.stderr, flush=True)
        results.append(step_cost.in_fresh_process(profile_method, method, config))
        if progress is not None:
            partial = _record(config, results, time.perf_counter() - start)
            _results.write_json_atomic(progress, {**partial, "partial": True})
    return _record(config, results, time.perf_counter() - start)


def _record(config: dict[str, Any], results: list[dict[str, Any]], wall_time_s: float) -> dict:
    return _results.make_record(
        suite=SUITE,
        part=config["part"],
        config=config,
        device=step_cost._device_name(config["device"]),
        dtype="float32",
        seeds=[0],
        results=results,
        summary=_summary(results),
        wall_time_s=wall_time_s,
        notes={
            "wall_s": "median over the profiled steps, device-synchronised at the phase's end",
            "operators": "top-level aten operators (from Python, hooks, autograd), per step",
            "kernels": "device kernels launched in the phase, per step (GPU only)",
            "device_busy_s": "summed kernel durations per step (GPU only)",
        },
    )


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The device's busy fraction of each phase, and each method's whole step over LoRA-AdamW's."""
    busy = {
        r["method"]: {
            phase: r[phase]["device_busy_s"] / r[phase]["wall_s"]
            for phase in PHASES
            if r[phase]["device_busy_s"] is not None
        }
        for r in results
    }
    summary: dict[str, Any] = {"device_busy_fraction": busy}
    whole = {r["method"]: sum(r[phase]["wall_s"] for phase in PHASES) for r in results}
    if "lora-adamw" in whole:
        summary["step_over_lora_adamw"] = {m: t / whole["lora-adamw"] for m, t in whole.items()}
    return summary


def table(record: dict[str, Any]) -> str:
    rows = []
    for r in record["results"]:
        row = [r["method"]]
        for phase in PHASES:
            p = r[phase]
            busy = p["device_busy_s"]
            row += [
                f"{p['wall_s'] * 1e3:.1f}",
                "–" if busy is None else f"{busy * 1e3:.1f} ({busy / p['wall_s']:.0%})",
                f"{p['operators']:.0f}",
                "–" if p["kernels"] is None else f"{p['kernels']:.0f}",
            ]
        rows.append(row)
    headers = ["method"]
    for phase in ("fwd+bwd", "step"):
        headers += [f"{phase} (ms)", "device busy (ms)", "operators", "kernels"]
    return f"### {record['part']} ({record['device']})\n\n" + _results.markdown_table(headers, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--part", choices=sorted(step_cost._E2E_MODELS), default="e2e-smollm2")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--smollm2-weights", choices=["pretrained", "random"], default="random")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(step_cost.E2E_METHODS))
    if unknown:
        parser.error(f"unknown method(s): {', '.join(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.quick and args.out is not None and args.out.resolve() == DEFAULT_OUT.resolve():
        parser.error("--quick results must not overwrite the committed results; pick another --out")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or (
        Path(tempfile.mkdtemp(prefix=f"lorsum-{SUITE}-")) if args.quick else DEFAULT_OUT
    )
    base = step_cost.part_configs(args.device, args.quick, args.smollm2_weights)[args.part]
    config = {
        **{k: base[k] for k in ("device", "part", "batch", "seq_len") if k in base},
        **{k: base[k] for k in ("rank", "autocast", "weights") if k in base},
        "methods": args.methods,
        "warmup": 1 if args.quick else 3,
        "steps": 1 if args.quick else 3,
    }
    path = out / f"{args.part}-{args.device}.json"
    progress = path.with_suffix(".partial.json")
    record = run(config, progress)
    _results.write_json_atomic(path, record)
    progress.unlink(missing_ok=True)
    print(table(record), end="\n\n")
    print(f"{SUITE}: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
