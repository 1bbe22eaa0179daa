"""MkDocs hook: the Results pages, generated at build time from ``benchmarks/results/``.

Nothing on these pages is typed by hand: every table is rendered from the committed JSON files
(the ``lorsum compare`` summaries and the suites' records, with the suites' own table functions
where they have one) and every figure is the committed PNG, copied into the site. The hook also

* copies every PNG under ``benchmarks/results/`` to ``results/files/`` in the site, and rewrites
  links such as ``../benchmarks/results/x.png`` in the hand-written pages (``performance.md``),
  which must keep working on GitHub too, to those copies;
* adds ``distributed.md`` to the navigation when it exists (a missing page is not listed).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
FILES_URI = "results/files"  # where the committed figures land in the site

# Hand-written pages that other branches add; listed in the navigation only if present.
OPTIONAL_PAGES = (("Guides", "Distributed training (exactness)", "distributed.md"),)


# --- MkDocs events ----------------------------------------------------------------------------


def on_config(config: Any) -> Any:
    if str(REPO) not in sys.path:  # the benchmarks package renders its own tables
        sys.path.insert(0, str(REPO))
    docs = Path(config["docs_dir"])
    for section, title, page in OPTIONAL_PAGES:
        if (docs / page).exists():
            _nav_section(config["nav"], section).append({title: page})
    return config


def on_files(files: Files, config: Any) -> Files:
    for png in sorted(RESULTS.rglob("*.png")):
        uri = f"{FILES_URI}/{png.relative_to(RESULTS).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    for uri, render in PAGES.items():
        files.append(File.generated(config, uri, content=render()))
    return files


_RESULT_LINK = re.compile(r"\]\((?P<path>(?:\.\./)+benchmarks/results/[^)\s]+)\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point links into ``benchmarks/results/`` at the copies inside the site."""
    page_dir = posixpath.dirname(page.file.src_uri)
    docs = Path(config["docs_dir"]).resolve()

    def relink(match: re.Match[str]) -> str:
        target = (docs / page_dir / match["path"]).resolve()
        try:
            inside = target.relative_to(RESULTS).as_posix()
        except ValueError:
            return match[0]
        copy = f"{FILES_URI}/{inside}"
        return f"]({posixpath.relpath(copy, page_dir or '.')})"

    return _RESULT_LINK.sub(relink, markdown)


def _nav_section(nav: list[Any], title: str) -> list[Any]:
    for entry in nav:
        if isinstance(entry, dict) and title in entry:
            return entry[title]
    raise KeyError(f"mkdocs.yml has no nav section {title!r}")


# --- rendering helpers ------------------------------------------------------------------------


def _load(relative: str) -> dict[str, Any]:
    return json.loads((RESULTS / relative).read_text(encoding="utf-8"))


def _table(headers: list[str], rows: Iterable[list[str]]) -> str:
    from benchmarks._results import markdown_table

    return markdown_table(headers, list(rows))


def _figure(relative: str, caption: str) -> str:
    """A committed PNG (``relative`` to ``benchmarks/results/``), linked from ``results/*.md``."""
    if not (RESULTS / relative).exists():
        return ""
    return f"![{caption}](files/{relative})\n\n*{caption}* (`benchmarks/results/{relative}`)\n"


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.{digits}g}"


def _source(relative: str) -> str:
    """Provenance of a summary: its file, and the code and machines of the runs it aggregates."""
    path = RESULTS / relative
    summary = json.loads(path.read_text(encoding="utf-8"))
    entries = [e for v in summary["variants"].values() for e in v["methods"].values()]
    if all("run_files" in e for e in entries):  # summaries since 2026-12-07 name their runs
        runs = [path.parent / name for e in entries for name in e["run_files"]]
    else:  # older ones: every run in their methods' folders, other budgets' included
        methods = {m for v in summary["variants"].values() for m in v["methods"]}
        runs = []
        for variant in summary["variants"]:
            for method in methods:
                folder = path.parent / f"{summary['task']}-{variant}" / method
                runs += folder.glob("lr*-seed*.json")
    shas, devices, torches = set(), set(), set()
    for run in runs:
        record = json.loads(run.read_text(encoding="utf-8"))
        env = record.get("environment", {})
        shas.add(str((env.get("git") or {}).get("sha", ""))[:7])
        devices.add(str(record.get("device", "")))
        torches.add(str(env.get("versions", {}).get("torch", "")))
    text = f"Source: `benchmarks/results/{relative}`"
    if runs:
        text += (
            f", aggregating {len(runs)} run files (code {', '.join(sorted(shas))}; device "
            f"{', '.join(sorted(devices))}; torch {', '.join(sorted(torches))})"
        )
    return text + ".\n"


def _as_percent(summary: dict[str, Any]) -> bool:
    """Scores stored as fractions (accuracy, F1, correlation) are shown in %."""
    if summary.get("metric_mode") != "max":
        return False
    values = [
        abs(e["final_mean"])
        for v in summary["variants"].values()
        for e in v["methods"].values()
        if isinstance(e.get("final_mean"), int | float) and math.isfinite(e["final_mean"])
    ]
    return bool(values) and max(values) <= 1.0


def summary_section(
    relative: str, heading: str, *, level: int = 2, also: Sequence[str] = ()
) -> str:
    """Tables of one ``lorsum compare`` summary: every variant, best method first; ``also``
    names other final numbers (the summary's ``other_finals``) shown as mean ± std columns."""
    summary = _load(relative)
    percent = _as_percent(summary)
    scale = 100.0 if percent else 1.0
    mode = summary.get("metric_mode", "min")
    metric = summary["metric"] + (" (%)" if percent else "")
    better = "higher" if mode == "max" else "lower"
    hashes = "#" * level
    parts = [f"{hashes} {heading}", "", _source(relative)]
    for variant, data in summary["variants"].items():
        methods = data["methods"]
        closure = data.get("gap_closure_vs_lora_sgd", {})
        seeds = max(len(e["seeds"]) for e in methods.values())
        parts += [
            f"{hashes}# {variant}",
            "",
            f"Final `{metric}` ({better} is better) at each method's selected learning rate, mean "
            f"± std over up to {seeds} seed(s); best first.",
            "",
        ]

        def key(item: tuple[str, dict[str, Any]]) -> float:
            value = item[1]["final_mean"]
            value = value if math.isfinite(value) else math.inf * (1 if mode == "min" else -1)
            return value if mode == "min" else -value

        rows = []
        for method, e in sorted(methods.items(), key=key):
            per_seed = ", ".join(_num(scale * v, 3) for v in e["final_per_seed"])
            row = [
                f"`{method}`",
                f"{e['lr']:g}",
                f"{_num(scale * e['final_mean'])} ± {_num(scale * e['final_std'], 2)}",
                per_seed,
                f"{e['wall_time_s_mean']:.1f}",
            ]
            if closure:
                row.append(f"{closure[method]:.2f}" if method in closure else "")
            for key in also:
                other = e.get("other_finals", {}).get(key)
                row.append(f"{_num(other['mean'])} ± {_num(other['std'], 2)}" if other else "")
            rows.append(row)
        headers = ["method", "lr", f"final {metric}", "per seed", "s / run"]
        if closure:
            headers.append("gap closure")
        headers += [f"`{key}`" for key in also]
        parts += [_table(headers, rows), ""]
        if closure:
            parts += [
                "Gap closure is `(L_LoRA-SGD − L) / (L_LoRA-SGD − L_SVDLoRA)` at the last step: "
                "1 means SVDLoRA's loss was reached, above 1 that it was passed.",
                "",
            ]
        swept = {m: e["sweep"] for m, e in methods.items() if len(e.get("sweep", [])) > 1}
        if swept:
            rates = sorted({s["lr"] for sweep in swept.values() for s in sweep}, reverse=True)
            sweep_rows = []
            for method, sweep in swept.items():
                by_lr = {s["lr"]: s["final_mean"] for s in sweep}
                cells = [_num(scale * by_lr[lr], 3) if lr in by_lr else "" for lr in rates]
                sweep_rows.append([f"`{method}`", *cells])
            parts += [
                f"Learning-rate sweep, final `{metric}` per rate (seed 0):",
                "",
                _table(["method", *(f"{lr:g}" for lr in rates)], sweep_rows),
                "",
            ]
    return "\n".join(parts) + "\n"


def _figures(pairs: Iterable[tuple[str, str]]) -> str:
    return "\n".join(_figure(path, caption) for path, caption in pairs)


# --- pages ------------------------------------------------------------------------------------

_GENERATED = (
    '!!! info "Generated page"\n    Built by `docs/_hooks/results.py` from the committed result '
    "files when the site is built; nothing here is typed by hand. The setup of each experiment "
    "is described in the README's results sections and in `lorsum compare --help`.\n"
)


def page_index() -> str:
    entries = [
        ("synthetic.md", "Synthetic task", "the paper's low-rank regression, every method"),
        ("image.md", "Image classification", "LeNet-5 and PatchMLP with rank-16 adapters"),
        ("glue.md", "GLUE", "MiniLM with LoRA r = 8; quick and full sizes; other adapters"),
        ("lm.md", "Language modelling", "SmolLM2-135M on WikiText-2"),
        ("squad.md", "SQuAD v2", "MiniLM with a span head"),
        ("approximation.md", "Approximation error", "k sweeps against the SVD projection"),
        ("step-cost.md", "Step cost and memory", "per-step latency, peak memory, state size"),
        ("../performance.md", "What a step costs", "the cost model and the targets (written)"),
        ("compression.md", "Compression", "LoRD and TRP"),
        ("reliability.md", "Reliability", "faults injected, bad inputs, soak and fuzzing"),
    ]
    lines = [
        "# Results",
        "",
        _GENERATED,
        "Every result is a JSON file under `benchmarks/results/`, written by `lorsum compare` "
        "or a `python -m benchmarks.<suite>` command, with its config, config hash, git SHA, "
        "versions and per-seed metrics. `lorsum report` renders the same `compare` runs as "
        "markdown (`benchmarks/results/compare/report.md`).",
        "",
        _table(
            ["page", "what"],
            ([f"[{title}]({uri})", what] for uri, title, what in entries),
        ),
        "",
        "How to read them, and which method to pick: [Choosing a method](../guides/choosing.md).",
        "",
    ]
    return "\n".join(lines)


def page_synthetic() -> str:
    summary = _load("compare/synthetic-summary.json")
    stochastic = summary["variants"]["stochastic"]["methods"]
    studies = []
    for sweeps in (1, 2, 8):
        cells = []
        for rank in ("", "-r16", "-r32"):
            e = stochastic.get(f"lorsum-x{sweeps}{rank}")
            cells.append(f"{_num(e['final_mean'], 3)} ± {_num(e['final_std'], 2)}" if e else "")
        studies.append([str(sweeps), *cells])
    return "\n".join(
        [
            "# Results: the synthetic task",
            "",
            _GENERATED,
            "A rank-8 model fits a Gaussian target from the balanced rank-r truncation of a "
            "random init (the paper's linear task). The metric is `‖W − W*‖² − f*`, with `f*` "
            "the rank-r Eckart–Young residual: 0 is the best any rank-r model can do. The "
            "deterministic variant uses the full batch and no momentum; the stochastic one "
            "mini-batches with momentum for the SGD-type methods.",
            "",
            _figure("compare/synthetic.png", "Synthetic task: loss curves, mean over seeds"),
            summary_section("compare/synthetic-summary.json", "Selected learning rates"),
            "## Momentum rank (stochastic)",
            "",
            "LoRSum's low-rank momentum at rank r' (default r' = r), final metric, mean ± std:",
            "",
            _table(["sweeps", "r' = r (default)", "r' = 16", "r' = 32"], studies),
            "",
            summary_section(
                "compare-lr-sweep/synthetic-summary.json", "The learning-rate sweep (seed 0)"
            ),
        ]
    )


def page_image() -> str:
    return "\n".join(
        [
            "# Results: image classification",
            "",
            _GENERATED,
            "The paper's image task: a network whose linear layers are frozen random bases "
            "learned through rank-16 adapters; the convolutions are trained by one AdamW for "
            "every method, so only the LoRA optimizer differs. CIFAR-10 and Fashion-MNIST stand "
            "in for CIFAR-100.",
            "",
            _figure("compare/image.png", "LeNet-5: test accuracy during training"),
            summary_section("compare/image-summary.json", "LeNet-5"),
            _figure("compare/image-patchmlp.png", "PatchMLP: test accuracy during training"),
            summary_section("compare/image-patchmlp-summary.json", "PatchMLP"),
            "## Learning-rate sweeps",
            "",
            summary_section("compare-lr-sweep/image-summary.json", "LeNet-5 sweep", level=3),
            summary_section(
                "compare-lr-sweep/image-fashion-patchmlp-summary.json",
                "PatchMLP sweep, Fashion-MNIST",
                level=3,
            ),
            summary_section(
                "compare-lr-sweep/image-cifar10-patchmlp-summary.json",
                "PatchMLP sweep, CIFAR-10",
                level=3,
            ),
            _figures(
                [
                    ("compare-lr-sweep/image-fashion-patchmlp-lr.png", "PatchMLP, Fashion-MNIST"),
                    ("compare-lr-sweep/image-cifar10-patchmlp-lr.png", "PatchMLP, CIFAR-10"),
                ]
            ),
        ]
    )


def page_glue() -> str:
    return "\n".join(
        [
            "# Results: GLUE",
            "",
            _GENERATED,
            "all-MiniLM-L6-v2 with a new head and PEFT LoRA r = 8 on `query` and `value`; the "
            "head is trained by one AdamW for every method. The quick size trains 2 epochs on a "
            "fixed subset of 2,000 training examples; the full size 3 epochs on the whole train "
            "set. The other tasks reuse SST-2's tuned learning rates.",
            "",
            _figure("compare/glue.png", "GLUE quick size: dev score during training"),
            summary_section("compare/glue-summary.json", "Quick size"),
            "## Full size, at SST-2's rates (seed 0)",
            "",
            summary_section("compare-full/glue-sst2-summary.json", "SST-2", level=3),
            summary_section(
                "compare-full/glue-sst2-svdlora-summary.json", "SST-2, SVDLoRA alone", level=3
            ),
            summary_section("compare-full/glue-summary.json", "MRPC, CoLA, RTE, STS-B", level=3),
            _figures(
                [
                    ("compare-full/glue-sst2.png", "Full size, SST-2"),
                    ("compare-full/glue.png", "Full size, MRPC, CoLA, RTE and STS-B"),
                ]
            ),
            "## Full size, each task's own rates",
            "",
            summary_section("compare-full/glue-sweep-summary.json", "The sweep (seed 0)", level=3),
            summary_section(
                "compare-full/glue-sweep2-summary.json",
                "The second sweep, around the first's choices (seed 0)",
                level=3,
            ),
            summary_section(
                "compare-full/glue-ends-stsb-s1-summary.json",
                "STS-B, LoRSum's rates at the low end, two half decades further (seed 0)",
                level=3,
            ),
            summary_section(
                "compare-full/glue-ends-rte-s1-summary.json",
                "RTE, ScaledLoRSum-Shampoo's rate at the top, two half decades further (seed 0)",
                level=3,
            ),
            summary_section(
                "compare-full/glue-lorapro-s2-summary.json", "LoRA-Pro's sweep (seed 0)", level=3
            ),
            summary_section(
                "compare-full/glue-sst2-own-s1-summary.json",
                "SST-2's own sweep, around its quick rates (seed 0)",
                level=3,
            ),
            summary_section(
                "compare-full/glue-sst2-own-s2-summary.json",
                "SST-2's own sweep, re-centred on the first's choices (seed 0)",
                level=3,
            ),
            summary_section(
                "compare-full/glue-sst2-own-s3-summary.json",
                "SST-2's own sweep, re-centred once more (seed 0)",
                level=3,
            ),
            summary_section(
                "compare-full/glue-tuned4-summary.json",
                "Seeds 0-2 at the swept rates, all five tasks (every method but SVDLoRA)",
                level=3,
            ),
            summary_section(
                "compare-full/glue-svdlora-sweep-summary.json", "SVDLoRA, CoLA and STS-B", level=3
            ),
            summary_section(
                "compare-full/glue-svdlora-sweep-mrpc-rte-summary.json",
                "SVDLoRA, MRPC and RTE",
                level=3,
            ),
            summary_section(
                "compare-full/glue-svdlora-sweep2-summary.json",
                "SVDLoRA, its second sweep on RTE and STS-B",
                level=3,
            ),
            summary_section(
                "compare-full/glue-svdlora-stsb3-s2-summary.json",
                "SVDLoRA, STS-B below 0.003 (seed 0)",
                level=3,
            ),
            summary_section(
                "compare-full/glue-svdlora-mrpc-seeds-summary.json", "SVDLoRA, MRPC seeds", level=3
            ),
            summary_section(
                "compare-full/glue-svdlora-cola-seeds-summary.json", "SVDLoRA, CoLA seeds", level=3
            ),
            summary_section(
                "compare-full/glue-svdlora-rte-seeds-summary.json", "SVDLoRA, RTE seeds", level=3
            ),
            summary_section(
                "compare-full/glue-svdlora-stsb-seeds-summary.json", "SVDLoRA, STS-B seeds", level=3
            ),
            summary_section(
                "compare-full/glue-tuned2-summary.json",
                "Seeds 0-2 at the second sweep's rates (before the ends were swept further)",
                level=3,
            ),
            summary_section(
                "compare-full/glue-tuned-summary.json",
                "Seeds 0-2 at the first sweep's rates",
                level=3,
            ),
            _figures(
                [
                    ("compare-full/glue-sweep2-lr.png", "Full size: score against rate"),
                    ("compare-full/glue-tuned4.png", "Full size, swept rates: mean of 3 seeds"),
                ]
            ),
            "## Learning-rate sweeps on SST-2",
            "",
            _figure(
                "compare-lr-sweep/glue-sst2-lr-robustness.png",
                "SST-2: accuracy against learning rate (robustness)",
            ),
            summary_section("compare-lr-sweep/glue-sst2-summary.json", "LoRA methods", level=3),
            summary_section(
                "compare-lr-sweep/glue-sst2-full-adamw-summary.json", "Full fine-tuning", level=3
            ),
            summary_section(
                "compare-lr-sweep/glue-sst2-adapters-summary.json",
                "Other adapters (trained by AdamW)",
                level=3,
            ),
            _figure("compare-lr-sweep/glue-sst2-adapters-lr.png", "SST-2: the adapters' sweep"),
            "## On the CPU",
            "",
            summary_section("compare-cpu/glue-sst2-cpu-summary.json", "SST-2 quick, CPU", level=3),
            summary_section(
                "compare-cpu/glue-stsb-cpu-lorsum-low2-summary.json",
                "STS-B full, LoRSum's low rates, CPU (seed 0)",
                level=3,
            ),
            summary_section(
                "compare-cpu/glue-stsb-cpu-svdlora-low-summary.json",
                "STS-B full, SVDLoRA at 0.001 and 0.003, CPU (seed 0)",
                level=3,
            ),
            summary_section(
                "compare-cpu/glue-stsb-cpu-svdlora-seeds-summary.json",
                "STS-B full, SVDLoRA's seeds at 0.001, CPU",
                level=3,
            ),
            summary_section(
                "compare-cpu/glue-sst2-cpu-svdlora-s2-summary.json",
                "SST-2 full, SVDLoRA's sweep, CPU (seed 0)",
                level=3,
            ),
            summary_section(
                "compare-cpu/glue-sst2-cpu-svdlora-tuned-summary.json",
                "SST-2 full, SVDLoRA's seeds at its swept rate, CPU",
                level=3,
            ),
        ]
    )


def page_lm() -> str:
    return "\n".join(
        [
            "# Results: language modelling",
            "",
            _GENERATED,
            "SmolLM2-135M with LoRA r = 8 on `q_proj` and `v_proj`, trained on WikiText-2 and "
            "scored by test perplexity.",
            "",
            _figure("compare/lm.png", "Quick size: training curves"),
            summary_section("compare/lm-summary.json", "Quick size"),
            summary_section("compare-full/lm-summary.json", "Full size (seed 0)"),
            _figure("compare-full/lm.png", "Full size: training curves"),
            summary_section(
                "compare-full/lm-lora-sgd-sweep-summary.json", "Full size, LoRA-SGD's rates"
            ),
            summary_section(
                "compare-full/lm-full-own-tuned-summary.json",
                "Full size, its own rates: 3 seeds",
            ),
            _figure("compare-full/lm-full-own-tuned.png", "Full size, own rates: training curves"),
            summary_section(
                "compare-full/lm-full-own-svdlora-tuned-summary.json",
                "Full size, SVDLoRA at its own rate: 3 seeds",
            ),
            summary_section(
                "compare-full/lm-full-own-svdlora-early-seeds-summary.json",
                "Full size, SVDLoRA at its quick rate: 3 seeds",
            ),
            summary_section(
                "compare-full/lm-full-own-s1-summary.json",
                "Full size, its own sweep, first round (seed 0, three half decades around the "
                "quick rates)",
            ),
            _figure("compare-full/lm-full-own-s1-lr.png", "Full size: perplexity against rate"),
            summary_section(
                "compare-full/lm-full-own-s2-summary.json",
                "Full size, its own sweep, second round (seed 0, re-centred where the first "
                "round's best was at an end)",
            ),
            _figure(
                "compare-full/lm-full-own-s2-lr.png", "Full size, second round: perplexity vs rate"
            ),
            summary_section(
                "compare-full/lm-full-own-svdlora-s1-summary.json",
                "Full size, SVDLoRA's own sweep, first round (seed 0, around its quick rate)",
            ),
            summary_section(
                "compare-full/lm-full-own-svdlora-s2-summary.json",
                "Full size, SVDLoRA's own sweep, second round (seed 0, re-centred)",
            ),
            _figure(
                "compare-full/lm-full-own-svdlora-s2-lr.png", "SVDLoRA, full size: perplexity vs lr"
            ),
            summary_section("compare-lr-sweep/lm-summary.json", "Quick-size learning-rate sweep"),
            summary_section(
                "compare-lr-sweep/lm-scaled-shampoo-summary.json",
                "Quick size, ScaledLoRSum-Shampoo's rates up to 10",
            ),
            _figure("compare-lr-sweep/lm-lr.png", "Quick size: perplexity against rate"),
        ]
    )


# What a SQuAD table shows beside F1: answers found, the best no-answer threshold, the loss.
SQUAD_ALSO = ("HasAns_f1", "best_f1", "eval_loss")


def page_squad() -> str:
    return "\n".join(
        [
            "# Results: SQuAD v2",
            "",
            _GENERATED,
            "MiniLM with LoRA r = 8 and a span head; F1 on held-out questions (SQuAD v2's "
            "unanswerable share is what answering nothing scores).",
            "",
            _figure("compare/squad.png", "Quick size: training curves"),
            summary_section("compare/squad-summary.json", "Quick size"),
            summary_section("compare-lr-sweep/squad-summary.json", "Learning-rate sweep"),
            _figure("compare-lr-sweep/squad-lr.png", "F1 against learning rate"),
            summary_section("compare-full/squad-summary.json", "Full size (seed 0)"),
            _figure("compare-full/squad.png", "Full size: F1 during training"),
            summary_section(
                "compare-full/squad-long-summary.json",
                "Twice the full size, 604 steps, at SST-2's rates (seed 0)",
            ),
            summary_section(
                "compare-full/squad-long-up-summary.json",
                "604 steps, full fine-tuning and LoRA-AdamW one half decade higher (seed 0)",
            ),
            summary_section(
                "compare-full/squad-604-tuned-summary.json",
                "604 steps, its own rates: 3 seeds",
                also=SQUAD_ALSO,
            ),
            _figure("compare-full/squad-604-tuned.png", "604 steps, own rates: F1 during training"),
            summary_section(
                "compare-full/squad-604-svdlora-tuned-summary.json",
                "604 steps, SVDLoRA at its own rate: 3 seeds",
                also=SQUAD_ALSO,
            ),
            summary_section(
                "compare-full/squad-604-s1-summary.json",
                "604 steps, its own sweep, first round (seed 0, three half decades around the "
                "SST-2 rates)",
                also=SQUAD_ALSO,
            ),
            _figure("compare-full/squad-604-s1-lr.png", "604 steps: F1 against rate"),
            summary_section(
                "compare-full/squad-604-s2-summary.json",
                "604 steps, its own sweep, second round (seed 0, re-centred where the first "
                "round's best was at an end)",
                also=SQUAD_ALSO,
            ),
            _figure("compare-full/squad-604-s2-lr.png", "604 steps, second round: F1 vs rate"),
            summary_section(
                "compare-full/squad-604-s3-summary.json",
                "604 steps, third round (LoRA-SGD and LoRSum with 2 sweeps)",
                also=SQUAD_ALSO,
            ),
            summary_section(
                "compare-full/squad-604-svdlora-s1-summary.json",
                "604 steps, SVDLoRA's own sweep, first round (seed 0, around its SST-2 rate)",
                also=SQUAD_ALSO,
            ),
            summary_section(
                "compare-full/squad-604-svdlora-s2-summary.json",
                "604 steps, SVDLoRA's own sweep, second round (seed 0, re-centred)",
                also=SQUAD_ALSO,
            ),
            _figure("compare-full/squad-604-svdlora-s2-lr.png", "SVDLoRA at 604 steps: F1 vs rate"),
        ]
    )


def page_approximation() -> str:
    from benchmarks import approx_error

    state = _load("optimizer_state/state.json")
    state_rows = [
        [
            f"`{method}`",
            f"{s['state_MiB_per_block']:.2f}",
            f"{s['state_MiB_whole_model']:.0f}",
            f"{s['median_step_ms']:.1f}",
        ]
        for method, s in state["summary"].items()
    ]
    return "\n".join(
        [
            "# Results: approximation error and optimizer state",
            "",
            _GENERATED,
            "## How close k sweeps come to the SVD projection",
            "",
            "`python -m benchmarks.approx_error`: the LoRA step `T = B0 A0 − lr·SᵀX` fitted by "
            "`lorsum.functional.lorsum` with k sweeps, against its truncated SVD "
            "`Π_r(T)` (Eckart–Young), on a random and a slowly decaying spectrum. The Concepts "
            "page draws the same quantity on a small problem.",
            "",
            approx_error.quality_tables(_load("approx_error/quality.json")),
            "",
            "Source: `benchmarks/results/approx_error/quality.json`.",
            "",
            "## One sweep against the dense SVD projection",
            "",
            approx_error.cost_table(_load("approx_error/cost.json")),
            "",
            "Source: `benchmarks/results/approx_error/cost.json`.",
            "",
            "## Optimizer state per method",
            "",
            "`python -m benchmarks.optimizer_state`: one SmolLM2-135M decoder block (its seven "
            "linears, rank 16), state measured; the whole-model column multiplies by the number "
            "of blocks.",
            "",
            _table(
                ["method", "state MiB / block", "state MiB / whole model", "step ms / block"],
                state_rows,
            ),
            "",
            "Source: `benchmarks/results/optimizer_state/state.json`.",
            "",
        ]
    )


def page_step_cost() -> str:
    from benchmarks import step_cost

    out = RESULTS / "step_cost"
    parts = [
        "# Results: step cost and memory",
        "",
        _GENERATED,
        "`python -m benchmarks.step_cost`: per-step latency (median), state size and peak memory "
        "per method, on a CPU and an H200, with the cost model's floor where the device's "
        "ceilings were measured. The tables are those of `--summarize-only`. The written "
        "account, with the targets, is [What a step costs](../performance.md).",
        "",
    ]
    figures = {
        "axes": "step time against m = n",
        "e2e-minilm": "whole training steps, MiniLM (relative to LoRA-AdamW)",
        "e2e-smollm2": "whole training steps, SmolLM2-135M (relative to LoRA-AdamW)",
    }
    for path in sorted(out.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        ceilings = step_cost._stored_ceilings(out, record["device"])
        parts += [step_cost.table(record, ceilings).replace("### ", "## ", 1), ""]
        parts += [f"Source: `benchmarks/results/step_cost/{path.name}`.", ""]
        png = path.with_suffix(".png")
        if png.exists():
            caption = f"{figures.get(record['part'], record['part'])} ({record['device']})"
            parts.append(_figure(f"step_cost/{png.name}", caption))
    from benchmarks import step_profile

    for path in sorted((RESULTS / "step_profile").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        title = f"## Where the time goes: {record['part']} ({record['device']}), profiled"
        body = step_profile.table(record).split("\n", 2)[2]  # the table, without its heading
        parts += [
            title,
            "",
            body,
            "",
            f"Source: `benchmarks/results/step_profile/{path.name}`.",
            "",
        ]
    return "\n".join(parts)


def page_compression() -> str:
    from benchmarks import lord, trp

    lord_record = _load("lord/smollm2-wikitext2.json")
    trp_record = _load("trp/cifar10-lenet5.json")
    return "\n".join(
        [
            "# Results: compression",
            "",
            _GENERATED,
            "## LoRD on SmolLM2-135M",
            "",
            "`python -m benchmarks.lord`: every projection replaced by two thin layers; "
            "WikiText-2 test perplexity against the share of parameters removed, for the weight "
            "SVD and the data-aware (output covariance) variants.",
            "",
            lord.format_points(lord_record),
            "",
            "Exact against fast solvers:",
            "",
            lord.format_solvers(lord_record),
            "",
            _figure("lord/smollm2-wikitext2.png", "LoRD: perplexity against parameters removed"),
            "Source: `benchmarks/results/lord/smollm2-wikitext2.json`.",
            "",
            "## TRP on the image task",
            "",
            "`python -m benchmarks.trp`: trained rank pruning of LeNet-5 on the CIFAR-10 quick "
            "subset, against post-hoc truncation at the ranks TRP ended with.",
            "",
            trp.format_table(trp_record["summary"]),
            "",
            _figure("trp/cifar10-lenet5.png", "TRP against post-hoc truncation"),
            "Source: `benchmarks/results/trp/cifar10-lenet5.json`.",
            "",
        ]
    )


def page_reliability() -> str:
    from benchmarks import reliability

    record = _load("reliability/reliability.json")
    fuzz = record["results"]["fuzz"]
    per_method = _table(
        ["optimizer", "fuzzed examples"],
        ([f"`{name}`", f"{count:,}"] for name, count in fuzz["examples_by_method"].items()),
    )
    return "\n".join(
        [
            "# Reliability",
            "",
            _GENERATED,
            "An optimizer that silently corrupts a long fine-tune is worse than none. This page "
            "lists the faults lorsum's tests inject, the bad inputs they try, and the figures of "
            "the long soak and fuzz runs, from "
            "`benchmarks/results/reliability/reliability.json` "
            "(`python -m benchmarks.reliability`).",
            "",
            "## The figures",
            "",
            reliability.format_table(record),
            "",
            f"The soak: {reliability.SOAK_METHOD} (one sweep, momentum) on the synthetic task's "
            f"{reliability.SOAK_VARIANT} variant at its benchmark learning rate, float32 against "
            "float64 from the same init and batches, checked every "
            f"{record['results']['soak']['every']} steps; the limit is "
            f"{reliability.SOAK_TOLERANCE:g} relative in `B A`, and `‖B‖/‖A‖` must stay in "
            f"[{reliability.BALANCE_RANGE[0]:g}, {reliability.BALANCE_RANGE[1]:g}]. The fuzz: "
            "Hypothesis cases over shapes 1–16, ranks 1–8, float32 and float64, damping 0 to 1, "
            "0–3 sweeps, momentum, learning rates 0 to 10 and 1–3 steps; every step must keep "
            "the factors' shapes and dtypes, write only finite values, and with `lr = 0` leave "
            f"`s B A` unchanged (seed {fuzz['seed']}):",
            "",
            per_method,
            "",
            "CI runs the same checks shorter: 200 soak steps and a derandomised 60-example fuzz "
            "(`tests/test_soak.py`, `tests/optim/test_fuzz.py`); `-m slow` runs the full "
            "lengths.",
            "",
            "## Faults injected",
            "",
            "- **Non-finite gradients** (NaN or inf in one target, so every gradient and "
            "captured row is non-finite) for every guarded optimizer (LoRSum, ScaledLoRSum "
            "with K-FAC and Shampoo, SVDLoRA, PrecondLoRA, LoRA-Pro): factors and every state "
            "tensor untouched, `skipped_steps` counts it, training continues exactly as if the "
            "step had not happened (`tests/optim/test_faults.py`).",
            '- **One bad pair among good ones**: with `nonfinite="skip_pair"` (the default, '
            'no host synchronisation) only that pair is skipped; with `"skip_all"` every pair '
            "and dense group keeps its values. One `RuntimeWarning` per optimizer either way.",
            "- **`torch.amp.GradScaler`** skipping an inf step, with every optimizer.",
            "- **Ill-conditioned problems**: the LoRA start `B = 0`, rank-deficient factors, "
            "zero gradients and `damping = 0` (solved as the limit on the Gram's range, never an "
            "identity fallback), and a Shampoo metric that is not finite (the step is skipped).",
            "- **Process death**: `kill -9` of a running `lorsum compare` sweep; the rerun keeps "
            "every finished run file byte for byte and redoes the rest, past a left-over temp "
            "file and a torn record (`tests/test_kill_resume.py`). Every result and cache is "
            "written to a temp file, fsynced and renamed.",
            "- **Checkpoints across devices**: optimizer state saved on CUDA or the CPU, loaded "
            "with `weights_only=True` on the other and back, returns bit for bit, with every "
            "state tensor in its saved dtype (`tests/optim/test_device_resume.py`; its CUDA "
            "legs, skipped without a GPU, passed on an NVIDIA H200 at commit 42b40ad, with the "
            "CUDA no-synchronisation tests: "
            "`benchmarks/results/reliability/cuda-tests-h200-42b40ad.log`).",
            "",
            "## Bad inputs tried",
            "",
            "Every public entry point raises `ValueError` or `TypeError` naming the value and "
            "what is allowed, each tested with `match=`: wrong shapes, dtypes and devices of "
            "factors, terms and metrics in the functional core; empty, malformed or duplicated "
            "param groups, unknown methods, invalid hyperparameters (learning rate, damping, "
            "sweeps, ranks, betas, policies) in the optimizers and `create_optimizer`; a model "
            "with no LoRA layers; a capture that does not record a pair. The command line "
            "prints one `lorsum compare: error: ...` line and exits with status 2 for a bad "
            "option, a missing or malformed data file, a missing model package or an unusable "
            "`--lr-from` summary (`tests/test_cli.py`).",
            "",
        ]
    )


PAGES: dict[str, Callable[[], str]] = {
    "results/index.md": page_index,
    "results/synthetic.md": page_synthetic,
    "results/image.md": page_image,
    "results/glue.md": page_glue,
    "results/lm.md": page_lm,
    "results/squad.md": page_squad,
    "results/approximation.md": page_approximation,
    "results/step-cost.md": page_step_cost,
    "results/compression.md": page_compression,
    "results/reliability.md": page_reliability,
}
