"""Sweep each method's rate until the choice lies inside the grid, then train the seeds there.

The protocol of the tuned tables (README, "each task's own rates"), as one command::

    python -m benchmarks.sweep_chain NAME [--around=-1,0,1] [--extensions 2] [--seeds 3] \\
        -- COMPARE-ARGS...

1. ``lorsum compare COMPARE-ARGS --lr-sweep-around=AROUND --seeds 1 --name NAME-s1``: seed 0 on
   the half-decade grid around each method's rate (the task's, or ``--lr-from``'s);
2. while some method's choice sits at an end of its sweep (at most ``--extensions`` times): the
   grid is re-centred on the choices of those methods only, ``--lr-sweep-around=-1,0,1
   --lr-from NAME-s<k>-summary --methods ...``; only the new points train, since the others are
   stored;
3. ``--lr-from`` every sweep (a later one wins), ``--seeds S``: the seeds at the chosen rates,
   summary ``NAME-tuned``.

With ``--jobs`` above 1, the seeds of the methods the first sweep settled do not wait for the
extensions: they train beside them in a second ``lorsum compare`` (summary ``NAME-s1-seeds``),
and the two share the ``--jobs`` processes in proportion to their runs, so that a GPU lease is not
spent on a few extension runs alone. The last stage then trains only what is left.

A method whose sweep scored the same at every rate (CoLA's majority-class ties, say) has no end
to move towards and does not extend the sweep. Every summary stays in ``--out-dir``, so each
stage can be rebuilt with ``--summarize-only``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import _cli, compare

__all__ = ["at_an_end", "jobs_for_the_extension", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep_chain",
        description="Sweep each method's learning rate (seed 0) until its best rate lies inside "
        "the grid, then train the seeds at that rate: a chain of `lorsum compare` calls.",
    )
    parser.add_argument("name", help="summary names NAME-s1, NAME-s2, ..., NAME-tuned")
    parser.add_argument(
        "--around",
        type=compare._half_decades,
        default=[-1, 0, 1],
        help="half-decade steps of the first sweep (default: -1,0,1)",
    )
    parser.add_argument(
        "--extensions",
        type=_cli.non_negative_int,
        default=2,
        help="re-centred sweeps at most, while a choice sits at an end (default: 2)",
    )
    parser.add_argument(
        "--seeds", type=_cli.positive_int, default=3, help="seeds at the chosen rates (default: 3)"
    )
    parser.epilog = (
        "After --: the `lorsum compare` arguments (task, variants, methods, --out-dir, ...)."
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        parser.error("give the `lorsum compare` arguments after --")
    split = argv.index("--")
    args, passed = parser.parse_args(argv[:split]), argv[split + 1 :]
    for option in ("--lr", "--lr-sweep", "--lr-sweep-around", "--seeds", "--name"):
        if any(a == option or a.startswith(option + "=") for a in passed):
            parser.error(f"{option} is set by the chain; pass only the other compare arguments")
    options = compare.build_parser().parse_known_args(passed)[0]
    out_dir, jobs = options.out_dir, options.jobs
    rest = _without(passed, "--lr-from")

    around = ",".join(str(step) for step in args.around)
    stage = f"{args.name}-s1"
    status = _compare([*passed, f"--lr-sweep-around={around}", "--seeds", "1", "--name", stage])
    sweeps, early = [stage], None
    for k in range(2, args.extensions + 2):
        if status != 0:
            break
        summary = _summary(out_dir, stage)
        ends = at_an_end(summary)
        print(f"sweep_chain: {stage}: at an end: {ends or 'none'}", flush=True)
        if not ends:
            break
        end_variants = list(dict.fromkeys(variant for variant, _ in ends))
        end_methods = list(dict.fromkeys(method for _, method in ends))
        extension_jobs = jobs
        settled = [m for m in _methods(summary) if m not in end_methods]
        if k == 2 and args.seeds > 1 and jobs > 1 and settled:
            seed_runs = (args.seeds - 1) * len(settled) * len(summary["variants"])
            extension_jobs = jobs_for_the_extension(jobs, len(ends), seed_runs)
            seeds_of_settled = {"--methods": ",".join(settled), "--jobs": jobs - extension_jobs}
            early = _launch(
                [*_set(rest, seeds_of_settled), "--lr-from", str(_path(out_dir, stage)),
                 "--seeds", str(args.seeds), "--name", f"{stage}-seeds"]
            )  # fmt: skip
        previous, stage = stage, f"{args.name}-s{k}"
        only_the_ends = {
            "--methods": ",".join(end_methods),
            "--variants": ",".join(end_variants),
            "--jobs": extension_jobs,
        }
        status = _compare(
            [*_set(rest, only_the_ends), "--lr-sweep-around=-1,0,1",
             "--lr-from", str(_path(out_dir, previous)), "--seeds", "1", "--name", stage]
        )  # fmt: skip
        sweeps.append(stage)
    if early is not None:
        early_status = early.wait()
        status = status or early_status
    if status != 0:
        return status
    sources = [option for sweep in sweeps for option in ("--lr-from", str(_path(out_dir, sweep)))]
    return _compare([*rest, *sources, "--seeds", str(args.seeds), "--name", f"{args.name}-tuned"])


def jobs_for_the_extension(jobs: int, extension_runs: int, seed_runs: int) -> int:
    """The processes of ``jobs`` that a re-centred sweep of ``extension_runs`` new runs takes
    while ``seed_runs`` seed runs train beside it: in proportion to the runs, at least one each."""
    share = round(jobs * extension_runs / (extension_runs + seed_runs))
    return max(1, min(jobs - 1, share))


def at_an_end(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """``(variant, method)`` whose chosen rate is the smallest or largest of its sweep, unless
    every rate of the sweep scored the same (no direction to move in)."""
    ends = []
    for variant, data in summary["variants"].items():
        for method, entry in data["methods"].items():
            sweep = entry["sweep"]
            rates = [point["lr"] for point in sweep]
            if len(sweep) < 2 or len({point["final_mean"] for point in sweep}) == 1:
                continue
            if entry["lr"] in (min(rates), max(rates)):
                ends.append((variant, method))
    return ends


def _compare(argv: list[str]) -> int:
    print("sweep_chain: lorsum compare " + " ".join(argv), flush=True)
    return compare.main(argv)


def _launch(argv: list[str]) -> subprocess.Popen[bytes]:
    """``lorsum compare argv`` in a process of its own, running beside the chain (``.wait()``)."""
    print("sweep_chain: beside it, lorsum compare " + " ".join(argv), flush=True)
    # The harness is imported from its checkout (as `lorsum` does), wherever the chain runs from.
    root = str(Path(compare.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.compare", *argv], env=env)


def _methods(summary: dict[str, Any]) -> list[str]:
    """Every method of ``summary``, in its order, once."""
    return list(dict.fromkeys(m for data in summary["variants"].values() for m in data["methods"]))


def _without(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without its ``option VALUE`` (or ``option=VALUE``) occurrences."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def _set(argv: Sequence[str], values: dict[str, object]) -> list[str]:
    """``argv`` with each option of ``values`` given that value, in place of any it had."""
    out = list(argv)
    for option in values:
        out = _without(out, option)
    return [*out, *(str(part) for option, value in values.items() for part in (option, value))]


def _path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}-summary.json"


def _summary(out_dir: Path, name: str) -> dict[str, Any]:
    return json.loads(_path(out_dir, name).read_text(encoding="utf-8"))


if __name__ == "__main__":
    raise SystemExit(main())
