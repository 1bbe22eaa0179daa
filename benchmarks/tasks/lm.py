"""Causal language modelling: SmolLM2-135M with rank-8 LoRA on WikiText-2 (for WikiText-103).

Model: SmolLM2-135M-Instruct (Llama, 30 layers, width 576; ``benchmarks/pretrained.py``) with PEFT
LoRA r = 8 on ``q_proj`` and ``v_proj`` (60 adapters), settings shared with the other fine-tuning
tasks (``benchmarks/tasks/_finetune.py``); ``full-adamw`` trains every weight instead.

Data (``<data_dir>/wikitext-2``): the standard tokenised WikiText-2 release, used as stored. Its
train split is not available here, so the model is fine-tuned on ``valid.txt`` and evaluated on
``test.txt``. Each file is tokenised once per process, as one stream of ids (the text with its
newlines, no special tokens). Training cuts the stream into contiguous blocks of ``seq_len``
tokens (the last, partial block is left out), visits them in a new random order every epoch
(``batch`` blocks per step) and minimises the mean next-token cross-entropy. The metric is test
perplexity, ``exp`` of the mean next-token negative log-likelihood over non-overlapping
``seq_len``-token windows of the first ``eval_tokens`` tokens of test: every token is predicted
once, except the first of each window, which has no context. Evaluated before training (step 0,
the pretrained perplexity) and ``evaluations`` more times, evenly spaced, so every run's curve
has the same length.

Stand-ins, stated plainly: the paper uses WikiText-103 and the original model weights. Neither
WikiText-103 nor WikiText-2's train split is available, and the SmolLM2 weights here are its Q4_1
GGUF quantisation dequantised to float32, not the original bf16 checkpoint, so the perplexities
are not comparable with published ones.

Sizes: ``quick`` (2 CPU cores): 256-token blocks, batch 4, 24 steps (24,576 training tokens,
about 9 % of ``valid.txt``), evaluated on the first 8,192 test tokens at steps 0, 12 and 24. The
pretrained perplexity there is 38.8 (27.6 on the first 4,088 tokens with 512-token windows, as in
``../shared/data/README.md``). On 2 otherwise idle CPU cores a lorsum-x1 run took 190 s (a
whole lora-adamw run was never timed on idle cores; its idle steps took 4.5 s and an evaluation
20 s), plus about 20 s once per process to dequantise the weights; while another process shares
the cores, several times longer. ``full`` (a GPU): 512-token blocks, batch 8, 2 epochs over all
of ``valid.txt`` (134 steps), evaluated on the whole test file at step 0 and 4 more times.

A run whose training loss or perplexity is not finite has diverged: it stops there, its
perplexity is recorded as ``inf`` (ranked last) and its curves are padded to the standard length
with their last value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import pretrained
from benchmarks.datasets import DataError, MissingDataError
from benchmarks.tasks import _finetune

VARIANTS = ("wikitext2-smollm2",)
METRIC = "test_perplexity"
METRIC_MODE = "min"
NEEDS_DATA = True
RANK = 8
TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class Size:
    """One budget of the task.

    Attributes:
        seq_len: tokens per training block and per evaluation window.
        batch: blocks per optimizer step (and windows per evaluation forward).
        steps: optimizer steps; ``None`` for ``epochs`` passes over ``valid.txt``.
        epochs: passes over ``valid.txt`` when ``steps`` is ``None``.
        eval_tokens: the first tokens of ``test.txt`` that are scored; ``None`` for all of them.
        evaluations: evaluations after the one at step 0, evenly spaced over the steps.
    """

    seq_len: int
    batch: int
    steps: int | None
    epochs: int
    eval_tokens: int | None
    evaluations: int


SIZES = {
    "quick": Size(seq_len=256, batch=4, steps=24, epochs=1, eval_tokens=8192, evaluations=2),
    "full": Size(seq_len=512, batch=8, steps=None, epochs=2, eval_tokens=None, evaluations=4),
}
# Tokens of valid.txt under SmolLM2's tokenizer: the epoch length of the full budget, so that
# default_steps needs neither the data nor the model (checked by a slow test when both exist).
VALID_TOKENS = 273_868

# Each method's learning rate: the best final test perplexity of seed 0 at the quick budget over
# five half decades (compare --lr-sweep-around=-2,-1,0,1,2) around the best of a first sweep of
# three half decades around SST-2's tuned rate; all stored in benchmarks/results/compare-lr-sweep/
# lm-*. Every optimum is inside the grid; ScaledLoRSum-Shampoo's (1, that grid's largest) was
# checked against 3 and 10 (lm-scaled-shampoo-summary.json).
_LEARNING_RATES = {
    "full-adamw": 0.0003, "lora-sgd": 1.0, "lora-adamw": 0.01, "loraplus": 0.003,
    "precond-sgd": 0.03, "precond-adamw": 0.01, "svdlora": 0.03, "lora-pro": 0.003,
    "lorsum-x1-nomom": 0.1, "lorsum-x1": 0.1, "lorsum-x2": 0.03, "lorsum-x8": 0.03,
    "scaled-kfac": 0.1, "scaled-shampoo": 1.0,
}  # fmt: skip

# (resolved path, tokenizer vocabulary size) -> the file's token ids (CPU, int64). The harness
# trains many runs in one process; each file is tokenised once.
_TOKEN_CACHE: dict[tuple[str, int], torch.Tensor] = {}
# (weights, device, scored ids, window, batch) -> the perplexity before training. Every run of a
# process starts from the same pretrained weights with B = 0, so it scores them once and saves
# each later run one of its five evaluations of the whole test file (full size).
_INITIAL_PERPLEXITY: dict[tuple[Any, ...], float] = {}


def methods(variant: str) -> dict[str, tuple[str, dict[str, Any]]]:
    _check_variant(variant)
    return dict(_finetune.METHODS)


def default_learning_rate(variant: str, method: str) -> float:
    _check_variant(variant)
    return _LEARNING_RATES[method]


def extras(variant: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {}


def default_steps(variant: str, size: str) -> int:
    """Optimizer steps of the budget: fixed (quick), or epochs × batches of ``valid.txt`` (full)."""
    _check_variant(variant)
    setting = _size(size)
    if setting.steps is not None:
        return setting.steps
    return setting.epochs * -(-(VALID_TOKENS // setting.seq_len) // setting.batch)


def train(
    variant: str, method: str, lr: float, seed: int, *, steps: int | None = None,
    device: str = "cpu", progress: Any = None, data_dir: str | Path = "../shared/data",
    size: str = "quick",
) -> dict[str, Any]:  # fmt: skip
    """One run: ``{"curves": {"test_perplexity", "train_loss"}, "final": {...}}``.

    ``curves["test_perplexity"]`` has ``evaluations + 1`` values (step 0 first) and
    ``curves["train_loss"]`` one per step; ``final`` holds the last perplexity, the pretrained
    one (``initial_test_perplexity``) and the number of tokens trained on (``train_tokens``).

    Raises:
        ValueError: an unknown variant, method or size, or a data file too short.
        FileNotFoundError: ``valid.txt`` or ``test.txt`` is missing under ``data_dir``.
    """
    _check_variant(variant)
    if method not in _finetune.METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(_finetune.METHODS)})")
    setting = _size(size)
    steps = default_steps(variant, size) if steps is None else steps
    folder = Path(data_dir) / "wikitext-2"
    for path in (folder / "valid.txt", folder / "test.txt"):
        if not path.is_file():
            raise MissingDataError(
                f"WikiText-2 file not found: {path} (the lm task reads valid.txt and test.txt "
                "from <data_dir>/wikitext-2; see ../shared/data/README.md)"
            )

    model, tokenizer = pretrained.load_smollm2()
    blocks = training_blocks(token_ids(folder / "valid.txt", tokenizer), setting.seq_len)
    test = token_ids(folder / "test.txt", tokenizer)[: setting.eval_tokens]
    if test.numel() < 2:
        raise DataError(f"{folder / 'test.txt'} has {test.numel()} tokens: nothing to score")
    blocks, test = blocks.to(device), test.to(device)

    torch.manual_seed(seed)  # the adapters' initialisation and LoRA dropout
    model = _finetune.prepare(model, method, TARGETS, RANK)
    model.to(device)
    optimizers = _finetune.Optimizers(model, method, lr)
    generator = torch.Generator().manual_seed(30_000 + seed)  # the order of the blocks
    points = evaluation_steps(steps, setting.evaluations)
    try:
        # several evaluation points fall on one step (step 0 too) only when steps < evaluations
        start = initial_perplexity(model, test, setting.seq_len, setting.batch)
        perplexities = [start] * points.count(0)
        losses: list[float] = []
        step = tokens = 0
        diverged = not math.isfinite(perplexities[0])
        while step < steps and not diverged:
            for batch in epoch_order(blocks.shape[0], setting.batch, generator):
                model.train()
                inputs = blocks[batch.to(device)]
                optimizers.zero_grad()
                loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    diverged = True
                    perplexities.append(math.inf)
                    break
                loss.backward()
                optimizers.step()
                step += 1
                tokens += inputs.numel()
                if progress is not None:
                    progress()
                if step in points[len(perplexities) :]:
                    value = perplexity(model, test, setting.seq_len, setting.batch)
                    perplexities += [value] * points[len(perplexities) :].count(step)
                    diverged = not math.isfinite(value)
                if diverged or step == steps:
                    break
    finally:
        optimizers.close()
    curve = _pad(perplexities, len(points))
    return {
        "curves": {"test_perplexity": curve, "train_loss": _pad(losses, steps)},
        "final": {
            "test_perplexity": curve[-1],
            "initial_test_perplexity": curve[0],
            "train_tokens": tokens,
        },
    }


def token_ids(path: Path, tokenizer: Any) -> torch.Tensor:
    """The whole file as one stream of token ids (int64, CPU), tokenised once per process."""
    key = (str(Path(path).resolve()), len(tokenizer))
    if key not in _TOKEN_CACHE:
        text = Path(path).read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def training_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``(num_blocks, seq_len)`` contiguous blocks of ``ids``; a final partial block is dropped.

    Raises:
        ValueError: fewer than ``seq_len`` tokens.
    """
    num_blocks = ids.numel() // seq_len
    if num_blocks == 0:
        raise DataError(f"{ids.numel()} training tokens: fewer than one block of {seq_len}")
    return ids[: num_blocks * seq_len].view(num_blocks, seq_len)


def epoch_order(
    num_blocks: int, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """One epoch: a random permutation of the block indices, in batches (the last may be short)."""
    return torch.randperm(num_blocks, generator=generator).split(batch)


def evaluation_steps(steps: int, evaluations: int) -> list[int]:
    """The steps after which the model is evaluated: 0, then ``evaluations`` evenly spaced."""
    return [k * steps // evaluations for k in range(evaluations + 1)]


def evaluation_windows(ids: torch.Tensor, seq_len: int, batch: int) -> list[torch.Tensor]:
    """``ids`` as non-overlapping windows of ``seq_len`` (the last may be shorter), in batches.

    A final window of one token predicts nothing and is left out.
    """
    full = ids.numel() // seq_len
    windows = list(ids[: full * seq_len].view(full, seq_len).split(batch))
    if ids.numel() - full * seq_len >= 2:
        windows.append(ids[full * seq_len :].unsqueeze(0))
    return windows


@torch.no_grad()
def negative_log_likelihood(
    model: nn.Module, ids: torch.Tensor, seq_len: int, batch: int
) -> tuple[float, int]:
    """Summed next-token NLL over the windows of ``ids``, and how many tokens were predicted."""
    model.eval()
    total, count = 0.0, 0
    for inputs in evaluation_windows(ids, seq_len, batch):
        logits = model(input_ids=inputs, use_cache=False).logits
        targets = inputs[:, 1:]
        nll = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum"
        )
        total += float(nll)
        count += targets.numel()
    return total, count


def initial_perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, batch: int) -> float:
    """``perplexity`` of a model about to train, remembered for later runs from the same weights.

    The model is the same function as its weights without the adapters whenever every LoRA B is
    zero (PEFT's start): A then multiplies nothing, so the key leaves A out and holds the sums of
    every other tensor. A model whose B is not zero is scored, not remembered.
    """
    named = list(model.named_parameters())
    if any("lora_B" in name and bool(p.detach().ne(0).any()) for name, p in named):
        return perplexity(model, ids, seq_len, batch)
    weights = tuple(
        (name, tuple(p.shape), float(p.detach().sum(dtype=torch.float64)),
         float(p.detach().abs().sum(dtype=torch.float64)))
        for name, p in named
        if "lora_A" not in name
    )  # fmt: skip
    key = (weights, str(ids.device), ids.numel(), int(ids.sum()), seq_len, batch)
    if key not in _INITIAL_PERPLEXITY:
        _INITIAL_PERPLEXITY[key] = perplexity(model, ids, seq_len, batch)
    return _INITIAL_PERPLEXITY[key]


def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, batch: int) -> float:
    """``exp`` of the mean next-token NLL over the windows of ``ids``; ``inf`` when not finite."""
    total, count = negative_log_likelihood(model, ids, seq_len, batch)
    mean = total / count
    if not math.isfinite(mean) or mean > math.log(torch.finfo(torch.float64).max):
        return math.inf
    return math.exp(mean)


def _pad(values: list[float], length: int) -> list[float]:
    """``values`` extended to ``length`` with its last value (NaN when there is none)."""
    return values + [values[-1] if values else math.nan] * (length - len(values))


def _size(size: str) -> Size:
    if size not in SIZES:
        raise ValueError(f"unknown lm size {size!r} (choose from {', '.join(SIZES)})")
    return SIZES[size]


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown lm variant {variant!r} (choose from {', '.join(VARIANTS)})")
