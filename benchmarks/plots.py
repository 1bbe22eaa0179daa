"""Plots of stored comparison results (matplotlib, headless)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FLOOR = 1e-3  # curves are drawn as max(metric, FLOOR) on a log axis
_STUDY = re.compile(r"^(?P<base>.+)-r(?P<rank>\d+)$")  # e.g. lorsum-x2-r16: a momentum-rank run


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    """Each method's mean curve at its selected learning rate, one panel per variant.

    A metric where lower is better is drawn as ``max(metric, 1e-3)`` on a log axis, so reaching
    the optimum (0) is visible as the floor (accuracies are drawn linearly); ``full-*``
    references, which can go below 0, are left out (the table has them). Runs of a momentum-rank
    study (``<method>-r<rank>``) get their own panel, next to the method they vary.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    higher_is_better = summary.get("metric_mode") == "max"
    x_label = summary.get("curve_points") or ("epoch" if higher_is_better else "step")
    panels = []
    for variant, data in summary["variants"].items():
        methods = {m: e for m, e in data["methods"].items() if not m.startswith("full-")}
        study = {m: e for m, e in methods.items() if _STUDY.match(m)}
        main = {m: e for m, e in methods.items() if m not in study}
        panels.append((variant, main))
        if study:
            bases = {_STUDY.match(m)["base"] for m in study}
            study.update({m: e for m, e in main.items() if m in bases})
            panels.append((f"{variant}: momentum rank", study))
    panels = [(title, methods) for title, methods in panels if methods]
    if not panels:  # only full fine-tuning references: the table has them
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (title, methods) in zip(axes[0], panels, strict=True):
        for i, (method, entry) in enumerate(sorted(methods.items())):
            curve = entry["mean_curve"]
            if not higher_is_better:
                curve = [max(value, FLOOR) for value in curve]
            # Losses are logged every step from 0; accuracies after each epoch, from epoch 1.
            start = 1 if higher_is_better else 0
            steps = range(start, start + len(curve))
            style = "-" if method.startswith(("lorsum", "scaled")) else "--"
            ax.plot(steps, curve, style, lw=1.3, color=colors[i % len(colors)],
                    label=f"{method} (lr {entry['lr']:g})")  # fmt: skip
        if not higher_is_better:
            ax.set_yscale("log")
        ax.set_title(f"{summary['task']}: {title}")
        ax.set_xlabel(x_label)
        floor = "" if higher_is_better else f" (floor {FLOOR:g})"
        ax.set_ylabel(f"{summary['metric']}, mean over seeds{floor}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write the figure atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def plot_lr_sweep(
    summary: dict[str, Any], path: Path, methods: Sequence[str] | None = None
) -> None:
    """Each method's final metric (mean over seeds) against its learning rate, one panel per
    variant: how wide the band of good rates is, on the sweep's common grid. ``methods`` picks
    some (default: all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = summary["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(6.8 * len(variants), 4.8), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (variant, data) in zip(axes[0], variants.items(), strict=True):
        chosen = {m: e for m, e in data["methods"].items() if methods is None or m in methods}
        for i, (method, entry) in enumerate(sorted(chosen.items())):
            rates = [point["lr"] for point in entry["sweep"]]
            values = [point["final_mean"] for point in entry["sweep"]]
            style = "o-" if method.startswith(("lorsum", "scaled")) else "s--"
            ax.plot(rates, values, style, ms=3.5, lw=1.3, color=colors[i % len(colors)],
                    label=method)  # fmt: skip
        ax.set_xscale("log")
        if summary.get("metric_mode") == "min":
            ax.set_yscale("log")
        ax.set_title(f"{summary['task']} ({variant}): learning-rate sweep")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final {summary['metric']}, mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Re-plot a stored summary: ``python -m benchmarks.plots SUMMARY OUTPUT [--lr-sweep]
    [--methods a,b]``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=main.__doc__)
    parser.add_argument("summary", type=Path, help="a <name>-summary.json of lorsum compare")
    parser.add_argument("output", type=Path, help="the PNG to write")
    parser.add_argument("--lr-sweep", action="store_true", help="metric against learning rate")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    args = parser.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    methods = args.methods.split(",") if args.methods else None
    if args.lr_sweep:
        plot_lr_sweep(summary, args.output, methods)
    else:
        if methods is not None:
            for data in summary["variants"].values():
                data["methods"] = {m: e for m, e in data["methods"].items() if m in methods}
        plot_curves(summary, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
