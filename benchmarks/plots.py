"""Plots of stored comparison results (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    """One panel per variant: each method's mean curve at its selected learning rate.

    The y axis is symmetric-log, because the synthetic task's excess loss goes to 0 (and full
    fine-tuning below it) while the LoRA baselines stay orders of magnitude above.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = summary["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(6.5 * len(variants), 4.8), squeeze=False)
    for ax, (variant, data) in zip(axes[0], variants.items(), strict=True):
        for method, entry in sorted(data["methods"].items()):
            style = "-" if method.startswith(("lorsum", "scaled")) else "--"
            ax.plot(entry["mean_curve"], style, lw=1.4, label=f"{method} (lr {entry['lr']:g})")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_title(f"{summary['task']} — {variant}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{summary['metric']} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
