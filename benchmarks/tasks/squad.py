"""SQuAD v2 extractive question answering with unanswerable questions: MiniLM with rank-8 LoRA.

The stand-in, stated plainly: the paper fine-tunes T5-small on the full SQuAD v2 (spec
``lorsum.md`` §6.6). Neither the official train set nor the full dev set is available here, only
the labelled half of the dev set (the CS224N split, ``../shared/data/squad-v2-cs224n/``), so this
task trains *and* evaluates on parts of that file, with an encoder and a span head instead of a
generator. **Its scores are not comparable with published SQuAD v2 numbers.**

Split, by article so that no context is seen in both parts: article ``i`` (0-based, file order)
goes to the eval part when ``i % 4 == 3``, to the train part otherwise. On ``dev-v2.0.json`` (16
articles, 6,078 questions) that gives, measured:

* train: 12 articles, 4,611 questions (2,184 answerable, 2,427 unanswerable);
* eval: 4 articles (Steam_engine, Harvard_University, Islamism, Force), 1,467 questions
  (726 answerable, 741 unanswerable).

Model: all-MiniLM-L6-v2 (``pretrained.load_minilm("question-answering")``) with PEFT LoRA, r = 8,
on ``query`` and ``value`` of every layer; the new span head (``qa_outputs``) is trained by the
shared head AdamW of ``_finetune`` for every method. Inputs are ``[CLS] question [SEP] context
[SEP]`` windows (contexts longer than a window overflow into further windows with a 128-token
stride). A training window's label is the answer's first and last token when the whole first gold
answer lies inside the window's context, else the ``[CLS]`` token (unanswerable questions, and
windows that miss the answer). Loss: the mean of the start and end cross-entropies.

Metric: the official SQuAD v2 evaluation, re-implemented (``squad_v2_scores``): exact match and
token F1 of normalised answers, the maximum over the gold answers; an unanswerable question's only
gold answer is the empty string. A question's prediction is its best span over all its windows
(start ≤ end, both in the context, at most 30 tokens) by start + end logit, or "" when the null
score (start + end logit of ``[CLS]``, the minimum over the windows) is higher. ``f1`` (percent,
higher is better) is the task's metric, at that untuned threshold. Each evaluation also records the
official script's ``best_exact`` and ``best_f1``, the scores at the best threshold on the null
score's margin over the best span, which show whether the spans are ranked well before the null
score is calibrated (runs stored before they were added lack them).

Sizes (window counts are for MiniLM's tokenizer):

* ``quick`` (2 CPU cores): windows of 256 tokens, batch 16, the first 50 steps of a shuffled epoch
  of the 5,736 train windows (an epoch would be 359 steps); evaluated after steps 25 and 50 on
  every fourth eval question in file order (367 questions: 179 answerable, 188 unanswerable; 397
  windows). Measured on the 2-core CPU of the development machine, one torch thread while another
  job used the second core: 245 s for ``lora-adamw`` (12 s of it tokenising, which later runs of
  the process skip) and 243 s for ``lorsum-x1``; about 4 s per step and 20 s per evaluation.
* ``full`` (for a GPU): windows of 384 tokens, batch 32, 2 epochs over all 4,817 train windows
  (2 × 151 = 302 steps), the whole eval part (1,467 questions in 1,467 windows), evaluated after
  steps 76, 151, 227 and 302.

Every run of a budget evaluates at the same steps (``evaluation_steps``), so its curves have equal
lengths across methods. Besides the scores, each evaluation records ``eval_loss`` (the training
loss on the eval windows): at the quick budget the model has not yet learnt to pick spans (with
the placeholder rates, ``lora-adamw`` and ``lorsum-x1`` answer "" to every question: F1 51.2, the
unanswerable share), so the losses are what tells methods apart there.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from benchmarks import pretrained
from benchmarks.datasets import DataError, MissingDataError
from benchmarks.tasks import _finetune

VARIANTS = ("squad-v2",)
METRIC = "f1"
METRIC_MODE = "max"
CURVE_POINTS = "evaluation (quick: after steps 25 and 50; full: every quarter of the budget)"
NEEDS_DATA = True
DATA_FILE = Path("squad-v2-cs224n") / "dev-v2.0.json"
RANK = 8
TARGET_MODULES = ("query", "value")
STRIDE = 128  # tokens shared by consecutive windows of one context
MAX_ANSWER_TOKENS = 30
EVAL_ARTICLE_EVERY = 4  # article i goes to the eval part when i % 4 == 3


class Size(NamedTuple):
    max_length: int  # tokens per window
    batch: int
    epochs: int
    max_steps: int | None  # cap on the optimizer steps (None: all epochs)
    eval_question_every: int  # evaluate on every n-th eval question in file order
    evaluations: int  # evaluations per run, at equal step intervals


SIZES = {
    "quick": Size(max_length=256, batch=16, epochs=1, max_steps=50, eval_question_every=4,
                  evaluations=2),
    "full": Size(max_length=384, batch=32, epochs=2, max_steps=None, eval_question_every=1,
                 evaluations=4),
}  # fmt: skip
# Train windows of the CS224N file (MiniLM's tokenizer, stride 128), counted once; they make
# default_steps exact without loading a tokenizer. train() counts the windows of the data it gets.
_TRAIN_WINDOWS = {256: 5736, 384: 4817}

# The rates the quick sweep selected (three half decades around SST-2's tuned rate, seed 0,
# benchmarks/results/compare-lr-sweep/squad-*). That sweep was flat: at 50 steps almost every run
# answers "" to every question (F1 51.2, the unanswerable share), so ties went to the lowest rate
# and these rates are not tuned in any useful sense; the full size must be swept (see the README).
_LEARNING_RATES = {
    "full-adamw": 3e-05, "lora-sgd": 0.1, "lora-adamw": 0.0003, "loraplus": 0.0001,
    "precond-sgd": 0.003, "precond-adamw": 0.001, "svdlora": 0.03, "lora-pro": 0.0001,
    "lorsum-x1-nomom": 0.1, "lorsum-x1": 0.03, "lorsum-x2": 0.03, "lorsum-x8": 0.003,
    "scaled-kfac": 0.01, "scaled-shampoo": 0.03,
}  # fmt: skip

_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
_LABELS = ("start_positions", "end_positions")
# Parsed files and tokenised windows, kept for the process: the harness runs many runs in one.
_EXAMPLES: dict[tuple[Any, ...], dict[str, list[Question]]] = {}
_FEATURES: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}


@dataclass(frozen=True)
class Question:
    """One labelled SQuAD v2 question; ``answers`` is empty when it is unanswerable."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_start: int | None  # character offset of the first answer in the context

    @property
    def answerable(self) -> bool:
        return bool(self.answers)


def methods(variant: str) -> dict[str, tuple[str, dict[str, Any]]]:
    _check_variant(variant)
    return dict(_finetune.METHODS)


def default_learning_rate(variant: str, method: str) -> float:
    _check_variant(variant)
    return _LEARNING_RATES[method]


def extras(variant: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {}


def default_steps(variant: str, size: str) -> int:
    """Optimizer steps of the budget on the CS224N file: epochs × batches, capped for ``quick``."""
    _check_variant(variant)
    settings = _size(size)
    return _budget(settings, _TRAIN_WINDOWS[settings.max_length])


def evaluation_steps(steps: int, evaluations: int) -> list[int]:
    """The steps after which a run evaluates: ``evaluations`` points at equal intervals, ending
    at ``steps`` (fewer, without repeats, when ``steps < evaluations``)."""
    return sorted({math.ceil(k * steps / evaluations) for k in range(1, evaluations + 1)})


def train(
    variant: str, method: str, lr: float, seed: int, *, steps: int | None = None,
    device: str = "cpu", progress: Any = None, data_dir: str | Path = "../shared/data",
    size: str = "quick",
) -> dict[str, Any]:  # fmt: skip
    """One run: ``{"curves": {"f1", "eval_loss", "train_loss"}, "final": {...}}``.

    ``final`` holds the last evaluation's ``squad_v2_scores`` (percent) and ``eval_loss``, and
    ``best_f1_over_evaluations``.
    """
    table = methods(variant)
    if method not in table:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(table)})")
    settings = _size(size)
    if steps is not None and steps < 1:
        raise ValueError(f"Invalid steps: {steps} (must be >= 1)")
    path = Path(data_dir) / DATA_FILE
    parts = load_split(path)
    eval_questions = parts["eval"][:: settings.eval_question_every]

    torch.manual_seed(seed)  # the new span head, the LoRA factors and dropout
    model, tokenizer = pretrained.load_minilm("question-answering")
    model = _finetune.prepare(
        model, method, TARGET_MODULES, RANK, modules_to_save=["qa_outputs"]
    ).to(device)
    optimizers = _finetune.Optimizers(model, method, lr)

    train_features = _cached_features(path, "train", parts["train"], tokenizer, settings)
    eval_features = _cached_features(
        path, f"eval/{settings.eval_question_every}", eval_questions, tokenizer, settings
    )
    windows = train_features["input_ids"].shape[0]
    steps = _budget(settings, windows) if steps is None else steps
    checkpoints = evaluation_steps(steps, settings.evaluations)
    on_device = {key: train_features[key].to(device) for key in (*_INPUTS, *_LABELS)}

    generator = torch.Generator().manual_seed(30_000 + seed)
    scores: list[dict[str, float]] = []
    losses: list[float] = []
    step = 0
    while step < steps:
        for batch in torch.randperm(windows, generator=generator).split(settings.batch):
            model.train()
            optimizers.zero_grad()
            width = int(train_features["lengths"][batch].max())  # pad to the batch's longest
            rows = batch.to(device)
            output = model(
                **{key: on_device[key][rows, :width] for key in _INPUTS},
                **{key: on_device[key][rows] for key in _LABELS},
            )
            output.loss.backward()
            optimizers.step()
            losses.append(float(output.loss.detach()))
            step += 1
            if progress is not None:
                progress()
            if step in checkpoints:
                scores.append(evaluate(model, eval_features, eval_questions, 2 * settings.batch))
            if step == steps:
                break
    optimizers.close()
    return {
        "curves": {
            METRIC: [s[METRIC] for s in scores],
            "eval_loss": [s["eval_loss"] for s in scores],
            "train_loss": losses,
        },
        "final": {**scores[-1], "best_f1_over_evaluations": max(s[METRIC] for s in scores)},
    }


# --------------------------------------------------------------------------------------- data


def load_split(path: str | Path) -> dict[str, list[Question]]:
    """The questions of a SQuAD v2 JSON file, split by article: ``{"train": [...], "eval": [...]}``.

    Article ``i`` (file order) goes to ``eval`` when ``i % 4 == 3``, else to ``train``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not SQuAD v2 JSON, or a part would be empty (fewer than 4 articles).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"SQuAD v2 file not found: {path} (see ../shared/data/README.md)")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _EXAMPLES:
        _EXAMPLES[key] = _split_articles(path)
    return _EXAMPLES[key]


def _split_articles(path: Path) -> dict[str, list[Question]]:
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        parts: dict[str, list[Question]] = {"train": [], "eval": []}
        for index, article in enumerate(articles):
            part = "eval" if index % EVAL_ARTICLE_EVERY == EVAL_ARTICLE_EVERY - 1 else "train"
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = qa["answers"]
                    parts[part].append(
                        Question(
                            id=qa["id"],
                            question=qa["question"],
                            context=paragraph["context"],
                            answers=tuple(a["text"] for a in answers),
                            answer_start=answers[0]["answer_start"] if answers else None,
                        )
                    )
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as error:
        raise DataError(f"{path} is not SQuAD v2 JSON ({type(error).__name__}: {error})") from error
    for name, questions in parts.items():
        if not questions:
            raise DataError(
                f"{path}: the {name} part is empty (article i goes to eval when "
                f"i % {EVAL_ARTICLE_EVERY} == {EVAL_ARTICLE_EVERY - 1}; {len(articles)} articles)"
            )
    return parts


def features(
    questions: Sequence[Question], tokenizer: Any, *, max_length: int, stride: int = STRIDE
) -> dict[str, torch.Tensor]:
    """Token windows of the questions, padded to ``max_length``, with labels and offsets.

    ``tokenizer`` must be a fast (``tokenizers``-backed) one: overflowing windows, offsets and
    ``sequence_ids`` come from it.

    Returns (``W`` windows, ``L = max_length``): ``input_ids``, ``token_type_ids``,
    ``attention_mask`` (W, L); ``lengths`` (W,), the unpadded lengths; ``question`` (W,), the
    index of each window's question; ``start_positions``, ``end_positions`` (W,), the answer's
    tokens or 0 (``[CLS]``); ``context_mask`` (W, L), true on context tokens; ``offsets``
    (W, L, 2), each token's character span in its context.

    Raises:
        ValueError: no questions.
    """
    if not questions:
        raise ValueError("no questions to tokenise")
    # In chunks: the tokenizer's Python lists take about 10 times the memory of the tensors.
    chunks = [
        _chunk_features(questions[first : first + _CHUNK], first, tokenizer, max_length, stride)
        for first in range(0, len(questions), _CHUNK)
    ]
    return {key: torch.cat([chunk[key] for chunk in chunks]) for key in chunks[0]}


_CHUNK = 500  # questions tokenised at a time


def _chunk_features(
    questions: Sequence[Question], first: int, tokenizer: Any, max_length: int, stride: int
) -> dict[str, torch.Tensor]:
    encoding = tokenizer(
        [q.question for q in questions], [q.context for q in questions],
        truncation="only_second", max_length=max_length, stride=stride,
        return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
    )  # fmt: skip
    owners = encoding["overflow_to_sample_mapping"]
    context_mask = torch.zeros(len(owners), max_length, dtype=torch.bool)
    starts = torch.zeros(len(owners), dtype=torch.long)
    ends = torch.zeros(len(owners), dtype=torch.long)
    for window, owner in enumerate(owners):
        in_context = [s == 1 for s in encoding.sequence_ids(window)]
        context_mask[window] = torch.tensor(in_context)
        question = questions[owner]
        if question.answerable:
            span = _answer_tokens(
                encoding["offset_mapping"][window], in_context, question.answer_start,
                question.answer_start + len(question.answers[0]),
            )  # fmt: skip
            if span is not None:
                starts[window], ends[window] = span
    attention_mask = torch.tensor(encoding["attention_mask"])
    return {
        "input_ids": torch.tensor(encoding["input_ids"]),
        "token_type_ids": torch.tensor(encoding["token_type_ids"]),
        "attention_mask": attention_mask,
        "lengths": attention_mask.sum(1),
        "question": torch.tensor(owners) + first,
        "start_positions": starts,
        "end_positions": ends,
        "context_mask": context_mask,
        "offsets": torch.tensor(encoding["offset_mapping"]),
    }


def _answer_tokens(
    offsets: Sequence[tuple[int, int]], in_context: Sequence[bool], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """The first and last token of the answer ``[start_char, end_char)``, or None when it is
    not wholly inside the window's context."""
    tokens = [i for i, inside in enumerate(in_context) if inside]
    if not tokens or offsets[tokens[0]][0] > start_char or offsets[tokens[-1]][1] < end_char:
        return None
    # The first token ending after the answer's start and the last one starting before its end:
    # robust to an answer_start that points at the whitespace before a word.
    first = next(i for i in tokens if offsets[i][1] > start_char)
    last = next(i for i in reversed(tokens) if offsets[i][0] < end_char)
    return first, last


def _cached_features(
    path: Path, part: str, questions: Sequence[Question], tokenizer: Any, settings: Size
) -> dict[str, torch.Tensor]:
    stat = path.stat()
    key = (
        str(path.resolve()), stat.st_mtime_ns, stat.st_size, part, settings.max_length, STRIDE,
        type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
    )  # fmt: skip
    if key not in _FEATURES:
        _FEATURES[key] = features(questions, tokenizer, max_length=settings.max_length)
    return _FEATURES[key]


# --------------------------------------------------------------------------------- evaluation


def evaluate(
    model: nn.Module, windows: Mapping[str, torch.Tensor], questions: Sequence[Question],
    batch: int,
) -> dict[str, float]:  # fmt: skip
    """``squad_v2_scores`` of the model's answers, ``best_threshold_scores`` of the same spans,
    and ``eval_loss``: the training loss (mean of the start and end cross-entropies) averaged
    over the windows."""
    scored = _score_windows(model, windows, batch)
    spans, margins = _candidates(windows, questions, scored)
    return {
        **squad_v2_scores(_answers(spans, margins), questions),
        **best_threshold_scores(spans, margins, questions),
        "eval_loss": scored["loss"],
    }


def predict(
    model: nn.Module, windows: Mapping[str, torch.Tensor], questions: Sequence[Question],
    batch: int,
) -> dict[str, str]:  # fmt: skip
    """Each question's predicted answer ("" for no answer) from the model's span logits.

    Over all windows of a question: the best span (start ≤ end, both in the context, at most
    ``MAX_ANSWER_TOKENS`` tokens) by start + end logit, unless the null score (the ``[CLS]``
    logits, the minimum over the windows) is higher. ``windows`` come from ``features`` of
    ``questions``; ``batch`` windows go through the model at a time.
    """
    return _answers(*_candidates(windows, questions, _score_windows(model, windows, batch)))


@torch.no_grad()
def _score_windows(
    model: nn.Module, windows: Mapping[str, torch.Tensor], batch: int
) -> dict[str, Any]:
    """Per window: the best span's score and tokens, the null score; and the mean loss."""
    model.eval()
    device = next(model.parameters()).device
    count = windows["input_ids"].shape[0]
    span_score = torch.empty(count)
    null_score = torch.empty(count)
    span = torch.empty(count, 2, dtype=torch.long)
    loss = torch.zeros((), device=device)
    # Shortest windows first, so that batches carry little padding; the order changes nothing.
    for rows in windows["lengths"].argsort(stable=True).split(batch):
        width = int(windows["lengths"][rows].max())
        output = model(**{key: windows[key][rows, :width].to(device) for key in _INPUTS})
        start, end = output.start_logits.float(), output.end_logits.float()
        scores, first, last = _best_spans(
            start, end, windows["context_mask"][rows, :width].to(device)
        )
        span_score[rows], span[rows, 0], span[rows, 1] = scores.cpu(), first.cpu(), last.cpu()
        null_score[rows] = (start[:, 0] + end[:, 0]).cpu()
        for logits, key in zip((start, end), _LABELS, strict=True):
            labels = windows[key][rows].to(device)
            loss += nn.functional.cross_entropy(logits, labels, reduction="sum") / 2
    return {"span_score": span_score, "span": span, "null_score": null_score,
            "loss": float(loss) / count}  # fmt: skip


def _candidates(
    windows: Mapping[str, torch.Tensor], questions: Sequence[Question], scored: dict[str, Any]
) -> tuple[dict[str, str], dict[str, float]]:
    """Per question id: its best span's text, and its no-answer margin (null score minus best
    span score; the question is answered "" when the margin is above the threshold, 0)."""
    best: dict[int, tuple[float, int]] = {}  # question -> (best span score, its window)
    null: dict[int, float] = {}  # question -> minimum null score
    for window, owner in enumerate(windows["question"].tolist()):
        score = float(scored["span_score"][window])
        if owner not in best or score > best[owner][0]:
            best[owner] = (score, window)
        null[owner] = min(null.get(owner, math.inf), float(scored["null_score"][window]))
    spans, margins = {}, {}
    for index, question in enumerate(questions):
        score, window = best[index]
        first, last = scored["span"][window].tolist()
        begin, end = windows["offsets"][window, first, 0], windows["offsets"][window, last, 1]
        spans[question.id] = question.context[int(begin) : int(end)]
        margins[question.id] = null[index] - score
    return spans, margins


def _answers(spans: Mapping[str, str], margins: Mapping[str, float]) -> dict[str, str]:
    return {qid: "" if margins[qid] > 0 else span for qid, span in spans.items()}


def _best_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per window, the best allowed span: (score, first token, last token), each (B,).

    ``start_logits``, ``end_logits``: (B, L); ``context``: (B, L) bool. Allowed spans lie in the
    context with ``first ≤ last < first + MAX_ANSWER_TOKENS``; a window with none scores -inf.
    """
    width = start_logits.shape[1]
    ones = torch.ones(width, width, dtype=torch.bool, device=start_logits.device)
    band = ones.triu() & ~ones.triu(MAX_ANSWER_TOKENS)  # (L, L): first ≤ last < first + 30
    allowed = band & context[:, :, None] & context[:, None, :]
    scores = start_logits.float()[:, :, None] + end_logits.float()[:, None, :]
    best, index = scores.masked_fill(~allowed, -math.inf).flatten(1).max(1)
    return best, index // width, index % width


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: SQuAD's rule."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the bags of normalised tokens; when either is empty, 1 if both are, else 0."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_v2_scores(
    predictions: Mapping[str, str], questions: Sequence[Question]
) -> dict[str, float]:
    """The official SQuAD v2 scores (no null-score threshold), in percent, with counts.

    Each question scores the maximum over its gold answers (those that normalise to the empty
    string are dropped, as in the official script); an unanswerable question's only gold answer
    is "", so it scores 1 exactly when the prediction normalises to "".

    Args:
        predictions: question id -> predicted answer ("" for no answer).
        questions: the questions to score, each of which must have a prediction.

    Returns:
        ``exact``, ``f1`` and ``total``, and ``HasAns_*`` / ``NoAns_*`` (``exact``, ``f1``,
        ``total``) for the groups that are not empty, as the official script leaves them out.

    Raises:
        ValueError: no questions, or a question without a prediction.
    """
    if not questions:
        raise ValueError("no questions to score")
    missing = [q.id for q in questions if q.id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} question(s) without a prediction, e.g. {missing[0]!r}")
    groups: dict[str, list[tuple[float, float]]] = {"HasAns": [], "NoAns": []}
    for question in questions:
        golds = [a for a in question.answers if normalize_answer(a)] or [""]
        prediction = predictions[question.id]
        groups["HasAns" if question.answerable else "NoAns"].append(
            (
                max(exact_match(prediction, gold) for gold in golds),
                max(token_f1(prediction, gold) for gold in golds),
            )
        )
    out = _percent(groups["HasAns"] + groups["NoAns"], "")
    for name, pairs in groups.items():
        if pairs:
            out.update(_percent(pairs, f"{name}_"))
    return out


def best_threshold_scores(
    spans: Mapping[str, str], margins: Mapping[str, float], questions: Sequence[Question]
) -> dict[str, float]:
    """SQuAD v2's ``best_exact`` and ``best_f1``: the scores at the best no-answer threshold.

    A question is answered with its span when its no-answer margin is at most the threshold, else
    "" (threshold 0 is ``squad_v2_scores``' rule). The official script reports these next to the
    plain scores, from the same predictions: they tell whether the spans are ranked well even
    when the null score is not yet calibrated, which a short fine-tuning leaves it. Questions with
    equal margins are answered together, since no threshold separates them.

    Returns:
        ``best_exact`` and ``best_f1`` (percent), and ``best_f1_answered``: how many questions
        the best F1's threshold answers (0 when answering none is best).
    """
    if not questions:
        raise ValueError("no questions to score")
    missing = [q.id for q in questions if q.id not in spans or q.id not in margins]
    if missing:
        raise ValueError(
            f"{len(missing)} question(s) without a span or margin, e.g. {missing[0]!r}"
        )
    gains: list[tuple[float, float, float]] = []  # (margin, exact gain, f1 gain) of answering
    exact = f1 = 0.0  # the scores when every question is answered ""
    for question in questions:
        golds = [a for a in question.answers if normalize_answer(a)] or [""]
        span = spans[question.id]
        empty = (max(exact_match("", g) for g in golds), max(token_f1("", g) for g in golds))
        answered = (max(exact_match(span, g) for g in golds), max(token_f1(span, g) for g in golds))
        exact, f1 = exact + empty[0], f1 + empty[1]
        if margins[question.id] < math.inf:  # else no window had a span: never answered
            gains.append((margins[question.id], answered[0] - empty[0], answered[1] - empty[1]))
    gains.sort(key=lambda gain: gain[0])
    best_exact, best_f1, best_answered = exact, f1, 0
    for index, (margin, exact_gain, f1_gain) in enumerate(gains):
        exact, f1 = exact + exact_gain, f1 + f1_gain
        if index + 1 < len(gains) and gains[index + 1][0] == margin:
            continue  # a tie: the next question is answered at every threshold that answers this
        best_exact = max(best_exact, exact)
        if f1 > best_f1:
            best_f1, best_answered = f1, index + 1
    count = len(questions)
    return {
        "best_exact": 100.0 * best_exact / count,
        "best_f1": 100.0 * best_f1 / count,
        "best_f1_answered": best_answered,
    }


def _percent(pairs: list[tuple[float, float]], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}exact": 100.0 * sum(e for e, _ in pairs) / len(pairs),
        f"{prefix}f1": 100.0 * sum(f for _, f in pairs) / len(pairs),
        f"{prefix}total": len(pairs),
    }


# ------------------------------------------------------------------------------------ helpers


def _budget(settings: Size, windows: int) -> int:
    steps = settings.epochs * -(-windows // settings.batch)
    return steps if settings.max_steps is None else min(steps, settings.max_steps)


def _size(size: str) -> Size:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (choose from {', '.join(SIZES)})")
    return SIZES[size]


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown squad variant {variant!r} (choose from {', '.join(VARIANTS)})")
