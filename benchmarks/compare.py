"""``lorsum compare``: train every method on a task, side by side, and keep every run.

One run is (task, variant, method, learning rate, seed). Each is written atomically to
``<out-dir>/<task>-<variant>/<method>/lr<lr>-seed<seed>.json`` (``...-seed<seed>-steps<N>.json``
when ``--steps`` departs from the task's budget) with its config and hash, the git SHA, package
versions, device, the per-step curves, final metrics, wall time and peak memory. A run whose file
holds the same config hash is loaded instead of re-run (``--force`` re-runs), so an interrupted
sweep loses no finished run; a file holding a run of another config is never replaced without
``--force``. At the end: a summary table (mean ± std over seeds), ``<task>-summary.json`` and a
PNG plot of the curves.

With ``--lr-sweep`` every method runs every learning rate of the list, and the summary keeps,
per method, the rate with the lowest mean final metric: the same budget and the same grid for
every method.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import queue
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import _cli, _results
from benchmarks.datasets import DataError
from benchmarks.pretrained import MissingModelError
from benchmarks.tasks import TASKS

DEFAULT_OUT = Path("runs") / "compare"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    variants = args.variants or list(task.VARIANTS)
    for variant in variants:
        if variant not in task.VARIANTS:
            parser.error(
                f"unknown variant {variant!r} of {args.task} (choose from {task.VARIANTS})"
            )
    if args.lr_sweep_around is not None and (args.lr is not None or args.lr_sweep is not None):
        parser.error("--lr-sweep-around sweeps around each method's rate: not with --lr/--lr-sweep")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.summarize_only:
        parser.error("--device cuda: no CUDA device is available")
    try:
        runs = plan(task, variants, args)
        records = load_stored(runs, args.out_dir) if args.summarize_only else execute(runs, args)
    except (_cli.UserError, DataError, MissingModelError) as error:
        # The user's to fix (a missing file, a typo): one line, not a traceback. Every run that
        # finished before it is stored already.
        return _cli.fail(parser.prog, error)
    summary = summarize(task, args.task, variants, records)
    name = args.name or args.task
    summary_path = args.out_dir / f"{name}-summary.json"
    _results.write_json_atomic(summary_path, summary)
    print(format_summary(summary))
    runs_line = "read" if args.summarize_only else "stored"
    print(f"\n{runs_line} {len(records)} run files under {args.out_dir}; wrote {summary_path}")
    if not args.no_plot:
        from benchmarks.plots import plot_curves

        png = args.out_dir / f"{name}.png"
        plot_curves(summary, png)
        print(f"wrote {png}")
        if any(
            len(e["sweep"]) > 1 for v in summary["variants"].values() for e in v["methods"].values()
        ):
            from benchmarks.plots import plot_lr_sweep

            png = args.out_dir / f"{name}-lr.png"
            plot_lr_sweep(summary, png)
            print(f"wrote {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorsum compare",
        description=(
            "Train LoRSum and every baseline on one task with equal budgets, several seeds, and "
            "print a results table; every run is stored as JSON and the curves are plotted. "
            "With no arguments: the synthetic low-rank task of the LoRSum paper, deterministic "
            "and stochastic, every method, 3 seeds (a few minutes on 2 CPU cores)."
        ),
    )
    parser.add_argument(
        "--task", choices=sorted(TASKS), default="synthetic", help="the task (default: synthetic)"
    )
    parser.add_argument(
        "--variants",
        type=_cli.names,
        default=None,
        help="comma-separated variants of the task (default: all)",
    )
    parser.add_argument(
        "--methods",
        type=_cli.names,
        default=None,
        help="comma-separated methods (default: every method of the task)",
    )
    parser.add_argument(
        "--seeds", type=_cli.positive_int, default=3, help="seeds 0..S-1 (default: 3)"
    )
    parser.add_argument(
        "--steps",
        type=_cli.positive_int,
        default=None,
        help="optimizer steps per run (default: the task's budget)",
    )
    parser.add_argument(
        "--size",
        choices=("quick", "full"),
        default="quick",
        help="for tasks with several sizes: quick (CPU, minutes) or full (the paper's budget, "
        "for a GPU) (default: quick)",
    )
    rates = parser.add_mutually_exclusive_group()
    rates.add_argument(
        "--lr",
        type=_cli.positive_float,
        default=None,
        help="one learning rate for every method (default: the task's tuned ones)",
    )
    rates.add_argument(
        "--lr-sweep",
        type=_rates,
        default=None,
        help="comma-separated learning rates: run each method at each, keep the best per method",
    )
    rates.add_argument(
        "--lr-from",
        type=str,
        action="append",
        default=None,
        metavar="SUMMARY[:VARIANT]",
        help="each method's selected learning rate from a summary JSON written by a sweep "
        "(repeat for several sweeps; a later file wins); with :VARIANT, that variant's rates "
        "serve every variant (e.g. rates tuned on SST-2 for the other GLUE tasks)",
    )
    parser.add_argument(
        "--lr-sweep-around",
        type=_half_decades,
        default=None,
        metavar="STEPS",
        help="comma-separated half-decade steps, e.g. --lr-sweep-around=-1,0,1: sweep each "
        "method around its own rate (the task's, or --lr-from's) on the grid 1, 3, 10, 30, ... "
        "× 10^k, keep the best per method",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to train (default: cpu)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("..") / "shared" / "data",
        help="datasets for the real-data tasks (default: ../shared/data)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where runs, summary and plot go (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--jobs",
        type=_cli.positive_int,
        default=1,
        help="runs trained at once, each in its own process sharing the CPU cores (and the GPU) "
        "evenly; small models leave a GPU mostly idle, so several jobs fill it. A run out of GPU "
        "memory is queued again behind the others, twice at most (default: 1)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="file name of the summary and plot, <name>-summary.json and <name>.png (default: "
        "the task's name); lets runs of some variants, or of another device, keep their own",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="re-run runs that are stored already, and replace stored runs of another config",
    )
    parser.add_argument(
        "--summarize-only",
        action="store_true",
        help="train nothing: rebuild the summary and plots from the stored runs of this plan "
        "(for example runs made on a GPU machine); fails if one is missing",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    return parser  # fmt: skip


def plan(task: Any, variants: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run's config, in a stable order."""
    runs = []
    chosen_rates = None
    if args.lr_from is not None:
        chosen_rates = {}
        for source in args.lr_from:
            chosen_rates.update(_rates_from_summary(source, variants))
    for variant in variants:
        table = task.methods(variant)
        chosen = args.methods or list(table)
        unknown = [m for m in chosen if m not in table]
        if unknown:
            raise _cli.UserError(
                f"unknown method(s) {', '.join(unknown)} for {variant} "
                f"(choose from {', '.join(table)})"
            )
        for method in chosen:
            optimizer, hparams = table[method]
            if args.lr_sweep is not None:
                rates = args.lr_sweep
            elif args.lr_sweep_around is not None:
                around = (
                    chosen_rates[variant, method]
                    if chosen_rates is not None and (variant, method) in chosen_rates
                    else task.default_learning_rate(variant, method)
                )
                rates = half_decade_grid(around, args.lr_sweep_around)
            elif chosen_rates is not None:
                if (variant, method) not in chosen_rates:
                    raise _cli.UserError(
                        f"no --lr-from summary selects a learning rate for {method} on {variant}"
                    )
                rates = [chosen_rates[variant, method]]
            else:
                rates = [
                    args.lr if args.lr is not None else task.default_learning_rate(variant, method)
                ]
            base = {
                "task": args.task, "variant": variant, "method": method, "optimizer": optimizer,
                "hparams": hparams, "steps": args.steps or task.default_steps(variant, args.size),
                "device": args.device,
                "data_dir": str(args.data_dir) if task.NEEDS_DATA else None,
            }  # fmt: skip
            if task.SIZES is not None:  # single-size tasks keep their configs (and hashes)
                base["size"] = args.size
            runs.extend(
                {**base, "lr": lr, "seed": seed} for lr in rates for seed in range(args.seeds)
            )
    return runs


def half_decade_grid(rate: float, steps: Sequence[int]) -> list[float]:
    """``rate`` moved by each of ``steps`` half decades on the grid ``{1, 3} × 10^k``.

    ``rate`` is first snapped to the nearest grid point in log scale (3 stands for ``10^½``), so
    that sweeps around different rates share their points: ``half_decade_grid(0.1, [-1, 0, 1])``
    is ``[0.03, 0.1, 0.3]``.
    """
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"Invalid rate: {rate!r} (must be finite and > 0)")
    centre = round(2 * math.log10(rate))
    rates = []
    for step in sorted(set(steps)):
        exponent, odd = divmod(centre + step, 2)
        rates.append(float(f"{(3 if odd else 1)}e{exponent}"))
    return rates


def _rates_from_summary(source: str, variants: Sequence[str]) -> dict[tuple[str, str], float]:
    """``(variant, method) -> lr`` of a summary; ``"file:VARIANT"`` maps VARIANT's rates to all."""
    path, from_variant = Path(source), None
    if not path.exists() and ":" in source:
        name, _, from_variant = source.rpartition(":")
        path = Path(name)
    try:
        summary = json.loads(path.read_text())
        rates = {
            (variant, method): float(entry["lr"])
            for variant, data in summary["variants"].items()
            for method, entry in data["methods"].items()
        }
    except (OSError, ValueError, KeyError, TypeError) as error:
        message = f"--lr-from {source}: not a readable summary ({error})"
        raise _cli.UserError(message) from None
    if from_variant is None:
        return rates
    if from_variant not in summary["variants"]:
        raise _cli.UserError(
            f"--lr-from {source}: the summary has no variant {from_variant!r} "
            f"(it has {', '.join(summary['variants'])})"
        )
    return {
        (variant, method): lr
        for (source_variant, method), lr in rates.items()
        if source_variant == from_variant
        for variant in variants
    }


def run_path(out_dir: Path, config: dict[str, Any]) -> Path:
    """``<task>-<variant>/<method>/lr<lr>-seed<seed>.json``, with ``-steps<N>`` before the suffix
    when the run's budget is not its size's default: a longer probe at the same rate and seed is
    another run, and must not take the file of the run at the task's budget."""
    name = f"lr{config['lr']:g}-seed{config['seed']}"
    if not has_default_budget(config):
        name += f"-steps{config['steps']}"
    return out_dir / f"{config['task']}-{config['variant']}" / config["method"] / f"{name}.json"


def has_default_budget(config: dict[str, Any]) -> bool:
    """Whether the run trains for its task's budget at its size (not a ``--steps`` override)."""
    task = TASKS[config["task"]]
    if "size" in config:
        return bool(config["steps"] == task.default_steps(config["variant"], config["size"]))
    return bool(config["steps"] == task.default_steps(config["variant"]))


def load_run(path: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The record at ``path`` if it was made with ``config``, wherever its data were mounted.

    A run's identity is its config without ``data_dir``: the same files read from ``/tmp/d`` on
    a GPU machine and from ``../shared/data`` here are the same run (the record still says where
    they were read). A record made with any other setting is not this run's: None.
    """
    record = _read_run(path)
    if record is None:
        return None
    if _results.config_hash(_identity(record["config"])) != _results.config_hash(_identity(config)):
        return None
    return record


def _read_run(path: Path) -> dict[str, Any] | None:
    """The run record at ``path``, or None: no file, not JSON, or no config in it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return None
    return record


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key != "data_dir"}


def conflicting_run(path: Path, config: dict[str, Any]) -> str | None:
    """How the run stored at ``path`` differs from ``config`` (``"key: stored ..., planned
    ..."``), or None when there is no run there or it is this one (wherever its data were
    mounted)."""
    record = _read_run(path)
    if record is None:
        return None  # no file, or not a run record: nothing finished would be lost
    mine, theirs = _identity(config), _identity(record["config"])
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if not differ:
        return None
    return ", ".join(
        f"{key}: stored {theirs.get(key)!r}, planned {mine.get(key)!r}" for key in differ
    )


def _check_no_other_runs(todo: list[dict[str, Any]], out_dir: Path) -> None:
    """Refuse to train a run whose file already holds a run of another config: training would
    replace a finished result (made with other settings, or by an older version of a method's
    table) with no trace. ``--force`` replaces it; another ``--out-dir`` keeps both."""
    for config in todo:
        path = run_path(out_dir, config)
        details = conflicting_run(path, config)
        if details is not None:
            raise _cli.UserError(
                f"{path} holds a run of another config ({details}); pass --force to replace "
                "it, or choose another --out-dir to keep both"
            )


def execute(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Load or run every run, writing each one as soon as it finishes."""
    todo = [c for c in runs if args.force or load_run(run_path(args.out_dir, c), c) is None]
    if not args.force:
        _check_no_other_runs(todo, args.out_dir)
    if args.jobs > 1 and len(todo) > 1:
        _execute_in_processes(todo, args.out_dir, args.jobs)
    else:
        total_steps = sum(c["steps"] for c in todo)
        with _Progress(total_steps, f"{len(todo)} of {len(runs)} runs to do", "step") as advance:
            for config in todo:
                record = train_one(config, advance)
                _results.write_json_atomic(run_path(args.out_dir, config), record)
    return load_stored(runs, args.out_dir)


def load_stored(runs: list[dict[str, Any]], out_dir: Path) -> list[dict[str, Any]]:
    """The stored record of every run; a missing or outdated one is an error naming its file."""
    records, missing = [], []
    for config in runs:
        record = load_run(run_path(out_dir, config), config)
        if record is None:
            missing.append(str(run_path(out_dir, config)))
        records.append(record)
    if missing:
        raise _cli.UserError(
            f"{len(missing)} of {len(runs)} runs are not stored (or were made "
            f"with another config), first: {missing[0]}"
        )
    return records


OUT_OF_MEMORY_RETRIES = 2  # tries again, each at the back of the queue, for a run out of GPU memory
OUT_OF_MEMORY_WAIT_S = 30.0  # before a retry, per attempt: time for the GPU's other runs to move on


def _execute_in_processes(
    todo: list[dict[str, Any]],
    out_dir: Path,
    jobs: int,
    *,
    worker: Callable[[tuple[dict[str, Any], str, float]], tuple[str, bool] | None] | None = None,
    wait_s: float = OUT_OF_MEMORY_WAIT_S,
) -> None:
    """Train ``todo`` in ``jobs`` worker processes (spawned: CUDA cannot be forked), each with
    its share of the CPU threads; every run is stored by its worker as soon as it ends, so a
    failure or an interrupt keeps what was finished.

    A run that raises is reported (its traceback by its worker) and the others go on: the pool
    would otherwise be torn down with every sibling run in flight, a lease's minutes with them.
    A run that ran out of GPU memory is queued again behind the others, at most
    ``OUT_OF_MEMORY_RETRIES`` times, and waits ``wait_s`` per attempt before it starts: on a
    shared GPU the memory it lacked is often free a few runs later (in one lease 5 of 8 LM runs
    were lost so, beside another lane). After the last run, the failures are one error.
    """
    worker = worker or _train_and_store
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    outcomes: queue.SimpleQueue[tuple[int, tuple[str, bool] | BaseException | None]] = (
        queue.SimpleQueue()
    )
    attempts = [0] * len(todo)
    failures = []
    with (
        context.Pool(jobs, initializer=torch.set_num_threads, initargs=(threads,)) as pool,
        _Progress(len(todo), f"{len(todo)} runs in {jobs} processes", "run") as advance,
    ):

        def submit(index: int) -> None:
            work = (todo[index], str(out_dir), wait_s * attempts[index])
            pool.apply_async(
                worker,
                (work,),
                callback=lambda outcome: outcomes.put((index, outcome)),
                error_callback=lambda error: outcomes.put((index, error)),
            )

        for index in range(len(todo)):
            submit(index)
        in_flight = len(todo)
        while in_flight:
            index, outcome = outcomes.get()
            if isinstance(outcome, BaseException):  # the worker itself died, not the run
                outcome = (f"{run_path(out_dir, todo[index])}: {outcome!r}", False)
            if outcome is not None:
                line, out_of_memory = outcome
                if out_of_memory and attempts[index] < OUT_OF_MEMORY_RETRIES:
                    attempts[index] += 1
                    print(f"out of GPU memory, queued again: {line.split(':')[0]}", flush=True)
                    submit(index)
                    continue
                failures.append(line)
            in_flight -= 1
            advance()
    if failures:
        raise _cli.UserError(
            f"{len(failures)} of {len(todo)} runs failed, the others are stored; "
            f"{'; '.join(failures)}"
        )


def _train_and_store(work: tuple[dict[str, Any], str, float]) -> tuple[str, bool] | None:
    """One run in a worker, stored after waiting ``wait_s``; ``None``, or what went wrong as one
    line and whether it was the GPU's memory (worth a retry)."""
    config, out_dir, wait_s = work
    time.sleep(wait_s)
    path = run_path(Path(out_dir), config)
    try:
        _results.write_json_atomic(path, train_one(config, lambda: None))
        return None
    except Exception as error:  # every failure, reported: see _execute_in_processes
        traceback.print_exc()
        failure = (f"{path}: {type(error).__name__}: {error}", _is_gpu_out_of_memory(error))
    # Out of the handler, the traceback's frames and their tensors are gone: what the run
    # reserved on the GPU can go back to its siblings.
    if config["device"] == "cuda":
        torch.cuda.empty_cache()
    return failure


def _is_gpu_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the GPU's allocator running out (a host ``MemoryError`` is not)."""
    return isinstance(error, torch.OutOfMemoryError)


def train_one(config: dict[str, Any], advance: Callable[[], None]) -> dict[str, Any]:
    task = TASKS[config["task"]]
    if config["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _results.reset_peak_rss()
    rss_before = _results.current_rss_bytes()
    start = time.perf_counter()
    options = {"data_dir": config["data_dir"]} if config["data_dir"] is not None else {}
    if "size" in config:
        options["size"] = config["size"]
    outcome = task.train(
        config["variant"], config["method"], config["lr"], config["seed"],
        steps=config["steps"], device=config["device"], progress=advance, **options,
    )  # fmt: skip
    wall = time.perf_counter() - start
    memory = {"cpu_peak_rss_above_start_bytes": _results.peak_rss_bytes() - rss_before}
    if config["device"] == "cuda":
        memory["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return _results.make_record(
        suite="compare", part=f"{config['task']}-{config['variant']}", config=config,
        device=_device_name(config["device"]), dtype="float32", seeds=(config["seed"],),
        wall_time_s=wall, results=outcome, summary={"peak_memory": memory},
    )  # fmt: skip


def summarize(task: Any, name: str, variants: Sequence[str], records: list[dict]) -> dict:
    """Mean ± std over seeds per (variant, method, lr); the best lr per method; task extras.

    Rates are ranked on the seeds that all of a method's rates have (a sweep's seed 0, when a
    store also holds more seeds at the chosen rate), so that a mean over three seeds never
    competes with one lucky seed; the chosen rate then reports every seed it has.
    """
    by_rate: dict[tuple[str, str], dict[float, list[dict]]] = {}
    for record in records:
        c = record["config"]
        by_rate.setdefault((c["variant"], c["method"]), {}).setdefault(c["lr"], []).append(record)
    out: dict[str, Any] = {
        "task": name,
        "metric": task.METRIC,
        "metric_mode": task.METRIC_MODE,
        "curve_points": getattr(task, "CURVE_POINTS", None),
        "variants": {},
    }
    for variant in variants:
        entries = {}
        for (v, method), rates in by_rate.items():
            if v != variant:
                continue
            candidates = [_aggregate(task.METRIC, lr, group) for lr, group in rates.items()]
            shared = set.intersection(*(set(e["seeds"]) for e in candidates))
            sweep = [_on_seeds(e, shared) for e in candidates]
            sign = -1.0 if task.METRIC_MODE == "max" else 1.0
            best_lr = min(sweep, key=lambda e: _sort_key(sign * e["final_mean"]))["lr"]
            best = next(e for e in candidates if e["lr"] == best_lr)
            entries[method] = {
                **best,
                "sweep": sorted(sweep, key=lambda e: e["lr"]),
                "run_files": _run_files(r for group in rates.values() for r in group),
            }
        out["variants"][variant] = {"methods": entries, **task.extras(variant, entries)}
    return out


def _run_files(records: Iterable[dict[str, Any]]) -> list[str]:
    """Where each aggregated run is stored, relative to the summary's folder: the provenance a
    report cites (a method's folder also holds runs of other budgets and sweeps). Every stored
    run names its task and budget; a record without them (a hand-made one) has no file."""
    configs = [r["config"] for r in records]
    return sorted(run_path(Path(), c).as_posix() for c in configs if "task" in c and "steps" in c)


def _aggregate(metric: str, lr: float, group: list[dict]) -> dict[str, Any]:
    finals = [r["results"]["final"][metric] for r in group]
    curves = [r["results"]["curves"][metric] for r in group]
    return {
        "lr": lr,
        "seeds": [r["config"]["seed"] for r in group],
        "final_mean": statistics.fmean(finals),
        "final_std": _spread(finals),
        "final_per_seed": finals,
        "mean_curve": [statistics.fmean(step) for step in zip(*curves, strict=True)],
        "wall_time_s_mean": statistics.fmean(r["wall_time_s"] for r in group),
        "other_finals": _other_finals(metric, group),
    }


def _other_finals(metric: str, group: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and std over the seeds of every other number a run ends with (SQuAD's HasAns F1,
    ``best_f1`` and evaluation loss, say): a table beside the selected metric reads them here,
    not from the run files one by one."""
    finals = [r["results"]["final"] for r in group]
    keys = [k for k in finals[0] if k != metric and all(_is_number(f.get(k)) for f in finals)]
    return {
        key: {"mean": statistics.fmean(f[key] for f in finals),
              "std": _spread([float(f[key]) for f in finals])}
        for key in keys
    }  # fmt: skip


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _on_seeds(entry: dict[str, Any], shared: set[int]) -> dict[str, Any]:
    """One rate's point of the sweep: its mean over the seeds every rate has (all of its own
    when the rates share none)."""
    pairs = zip(entry["seeds"], entry["final_per_seed"], strict=True)
    finals = [final for seed, final in pairs if not shared or seed in shared]
    return {"lr": entry["lr"], "final_mean": statistics.fmean(finals)}


def _spread(finals: list[float]) -> float:
    """The seeds' standard deviation; NaN when a seed diverged (``inf``/NaN), 0 for one seed."""
    if len(finals) == 1:
        return 0.0
    if not all(math.isfinite(value) for value in finals):
        return math.nan
    return statistics.stdev(finals)


def _sort_key(value: float) -> float:
    return math.inf if math.isnan(value) else value


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for variant, data in summary["variants"].items():
        lines.append(f"\n{summary['task']} ({variant}): final {summary['metric']}, mean ± std")
        rows = [
            [method, f"{e['lr']:g}", f"{e['final_mean']:.4g} ± {e['final_std']:.2g}",
             f"{e['wall_time_s_mean']:.1f}"]
            for method, e in data["methods"].items()
        ]  # fmt: skip
        lines.append(_results.markdown_table(["method", "lr", "final", "s / run"], rows))
        for key, value in data.items():
            if key != "methods":
                lines.append(f"{key}: {value}")
    return "\n".join(lines)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return _results.cpu_model() or "cpu"


class _Progress:
    """A tqdm bar over training steps when tqdm is installed; a no-op otherwise."""

    def __init__(self, total: int, description: str, unit: str) -> None:
        self.total, self.description, self.unit = total, description, unit
        self.bar: Any = None

    def __enter__(self) -> Callable[[], None]:
        try:
            from tqdm import tqdm
        except ImportError:
            return lambda: None
        self.bar = tqdm(total=self.total, desc=self.description, unit=self.unit, leave=False)
        return lambda: self.bar.update(1)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _half_decades(text: str) -> list[int]:
    try:
        return [int(part) for part in _cli.names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers (half decades), got {text!r}"
        ) from None


def _rates(text: str) -> list[float]:
    return [_cli.positive_float(part) for part in _cli.names(text)]


if __name__ == "__main__":
    raise SystemExit(main())
