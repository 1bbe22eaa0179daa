"""``lorsum report``: a markdown report built only from stored comparison runs.

It reads every run file under ``--out-dir`` (as written by ``lorsum compare``), aggregates them
exactly as ``compare`` does, and writes ``report.md`` with, per task and variant: the results
table at each method's selected learning rate, the learning-rate sweep when there is one, and
the task's extra figures (the synthetic task's gap closure). It never trains.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import _cli, _results
from benchmarks.compare import DEFAULT_OUT, has_default_budget, summarize
from benchmarks.tasks import TASKS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lorsum report",
        description="A markdown report from the runs stored by `lorsum compare` (no training).",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT,
        help=f"the directory `lorsum compare` wrote to (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="the report file (default: <out-dir>/report.md)"
    )
    args = parser.parse_args(argv)  # fmt: skip
    records = load_runs(args.out_dir)
    if not records:
        return _cli.fail(parser.prog, _cli.UserError(f"no run files under {args.out_dir}"))
    text = render(records)
    output = args.output or args.out_dir / "report.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(output)
    print(text)
    print(f"wrote {output}")
    return 0


def load_runs(out_dir: Path) -> list[dict[str, Any]]:
    """Every run record under ``out_dir`` (summaries and other files are skipped)."""
    records = []
    for path in sorted(out_dir.glob("*/*/lr*-seed*.json")):
        record = json.loads(path.read_text())
        if record.get("suite") == "compare":
            records.append(record)
    return records


def render(records: list[dict[str, Any]]) -> str:
    # Runs of another budget (``--steps``) than the task's are not seeds of the same runs: each
    # budget gets its own sections.
    by_task: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        config = record["config"]
        steps = 0 if has_default_budget(config) else int(config["steps"])
        by_task.setdefault((config["task"], steps), []).append(record)
    parts = ["# lorsum compare: stored results", ""]
    for (name, steps), task_records in sorted(by_task.items()):
        task = TASKS[name]
        variants = [
            v for v in task.VARIANTS if any(r["config"]["variant"] == v for r in task_records)
        ]
        summary = summarize(task, name, variants, task_records)
        parts += _task_section(summary, task_records, f", {steps} steps" if steps else "")
    return "\n".join(parts) + "\n"


def _task_section(
    summary: dict[str, Any], records: list[dict[str, Any]], budget: str = ""
) -> list[str]:
    lines = []
    shas = sorted({str((r["environment"]["git"] or {}).get("sha"))[:10] for r in records})
    for variant, data in summary["variants"].items():
        better = "higher" if summary.get("metric_mode") == "max" else "lower"
        sign = -1 if better == "higher" else 1
        lines += [
            f"## {summary['task']} ({variant}){budget}",
            "",
            f"Final {summary['metric']} ({better} is better), mean ± std over the seeds stored at "
            "each method's selected learning rate, the best on the seeds all its rates have. "
            f"Code: {', '.join(shas)}.",
            "",
        ]
        rows = [
            [m, f"{e['lr']:g}", f"{e['final_mean']:.4g} ± {e['final_std']:.2g}",
             str(len(e["seeds"])), f"{e['wall_time_s_mean']:.2f}"]
            for m, e in sorted(data["methods"].items(), key=lambda kv: sign * kv[1]["final_mean"])
        ]  # fmt: skip
        header = ["method", "lr", "final", "seeds", "s / run"]
        lines += [_results.markdown_table(header, rows), ""]
        closure = data.get("gap_closure_vs_lora_sgd")
        if closure:
            lines += [
                "Gap closure `(L_LoRA-SGD − L) / (L_LoRA-SGD − L_SVDLoRA)` at equal steps:",
                "",
                _results.markdown_table(
                    ["method", "gap closure"], [[m, f"{v:.3f}"] for m, v in closure.items()]
                ),
                "",
            ]
        swept = {m: e["sweep"] for m, e in data["methods"].items() if len(e["sweep"]) > 1}
        if swept:
            rates = sorted({s["lr"] for sweep in swept.values() for s in sweep}, reverse=True)
            rows = []
            for method, sweep in swept.items():
                by_lr = {s["lr"]: s["final_mean"] for s in sweep}
                rows.append([method, *(f"{by_lr[lr]:.3g}" if lr in by_lr else "" for lr in rates)])
            lines += [
                "Learning-rate sweep (final metric per rate, on the seeds all rates have):",
                "",
                _results.markdown_table(["method", *(f"{lr:g}" for lr in rates)], rows),
                "",
            ]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
