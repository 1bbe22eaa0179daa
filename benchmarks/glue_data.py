"""GLUE tasks from the standard TSV layout, and their official metrics.

The TSVs are read with ``csv.QUOTE_NONE``: default quoting silently merges rows of MRPC and
STS-B (``../shared/data/README.md``). Test splits carry no labels, so the benchmark uses train
and dev only.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.datasets import DataError, MissingDataError


@dataclass(frozen=True)
class GlueSpec:
    folder: str  # under <data_dir>/glue/
    text_columns: tuple[int, ...]  # one or two sentence columns
    label_column: int
    header: bool  # CoLA's train/dev files have none
    labels: tuple[str, ...] | None  # label strings in class order; None: a regression score
    metric: str  # the main metric: accuracy, f1, matthews or spearman
    encoding: str = "utf-8"


SPECS = {
    "sst2": GlueSpec("SST-2", (0,), 1, True, ("0", "1"), "accuracy"),
    "mrpc": GlueSpec("MRPC", (3, 4), 0, True, ("0", "1"), "f1", encoding="utf-8-sig"),
    "cola": GlueSpec("CoLA", (3,), 1, False, ("0", "1"), "matthews"),
    "rte": GlueSpec("RTE", (1, 2), 3, True, ("entailment", "not_entailment"), "accuracy"),
    "stsb": GlueSpec("STS-B", (7, 8), 9, True, None, "spearman"),
}


@dataclass(frozen=True)
class GlueSplit:
    texts: list[tuple[str, ...]]  # one tuple of one or two sentences per example
    labels: torch.Tensor  # (N,) int64 classes, or float32 scores for STS-B


def read_split(data_dir: str | Path, task: str, split: str) -> GlueSplit:
    """The ``train`` or ``dev`` split of a GLUE task (``sst2``, ``mrpc``, ``cola``, ``rte``,
    ``stsb``) from ``<data_dir>/glue/<TASK>/<split>.tsv``."""
    if task not in SPECS:
        raise ValueError(f"unknown GLUE task {task!r} (choose from {', '.join(SPECS)})")
    if split not in ("train", "dev"):
        raise ValueError(f"GLUE split must be 'train' or 'dev' (test has no labels), got {split!r}")
    spec = SPECS[task]
    path = Path(data_dir) / "glue" / spec.folder / f"{split}.tsv"
    if not path.is_file():
        raise MissingDataError(f"GLUE {task} {split} split not found: {path}")
    with path.open(encoding=spec.encoding, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if spec.header:
        rows = rows[1:]
    width = max(*spec.text_columns, spec.label_column) + 1
    texts, labels = [], []
    for line, row in enumerate(rows, start=2 if spec.header else 1):
        if not row:
            continue
        if len(row) < width:
            raise DataError(f"{path}, line {line}: expected at least {width} columns, got {row!r}")
        texts.append(tuple(row[c] for c in spec.text_columns))
        raw = row[spec.label_column]
        if spec.labels is None:
            labels.append(float(raw))
        elif raw in spec.labels:
            labels.append(spec.labels.index(raw))
        else:
            raise DataError(f"{path}, line {line}: label {raw!r} is not one of {spec.labels}")
    dtype = torch.float32 if spec.labels is None else torch.int64
    return GlueSplit(texts, torch.tensor(labels, dtype=dtype))


def scores(task: str, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """GLUE's metrics of ``task`` (fractions): accuracy (+ F1 for MRPC), Matthews correlation for
    CoLA, Pearson and Spearman for STS-B. ``score`` is the task's main metric."""
    spec = SPECS[task]
    if spec.labels is None:
        out = {
            "pearson": pearson(predictions.double(), labels.double()),
            "spearman": spearman(predictions.double(), labels.double()),
        }
    else:
        out = {"accuracy": float((predictions == labels).double().mean())}
        if task == "mrpc":
            out["f1"] = f1_positive(predictions, labels)
        if task == "cola":
            out["matthews"] = matthews(predictions, labels)
    out["score"] = out[spec.metric]
    return out


def f1_positive(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """F1 of class 1 (0 when there is no true positive)."""
    tp = int(((predictions == 1) & (labels == 1)).sum())
    fp = int(((predictions == 1) & (labels == 0)).sum())
    fn = int(((predictions == 0) & (labels == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Matthews correlation of two binary labelings (0 when a marginal is constant)."""
    tp = int(((predictions == 1) & (labels == 1)).sum())
    tn = int(((predictions == 0) & (labels == 0)).sum())
    fp = int(((predictions == 1) & (labels == 0)).sum())
    fn = int(((predictions == 0) & (labels == 1)).sum())
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation (NaN when either side is constant or non-finite)."""
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float("nan") if denominator == 0 else float((x * y).sum()) / denominator


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman correlation: Pearson of the ranks, ties given their average rank."""
    return pearson(_ranks(x), _ranks(y))


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = values.argsort(stable=True)
    sorted_values = values[order].tolist()
    ranks = torch.empty_like(values, dtype=torch.float64)
    start = 0
    n = values.numel()
    while start < n:  # runs of equal values share the mean of their positions
        end = start + 1
        while end < n and sorted_values[end] == sorted_values[start]:
            end += 1
        ranks[order[start:end]] = (start + end - 1) / 2
        start = end
    return ranks
