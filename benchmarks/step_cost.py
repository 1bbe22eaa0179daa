"""What one optimizer step costs, per method, as layer shape, rank, tokens and layer count grow.

LoRSum's promise is the SVDLoRA step at LoRA's cost: one sweep touches the captured rows
``X (N, n)`` and ``S (N, m)`` of a layer in about ``4·r·N·(m + n)`` flops, against ``4·N·m·n`` for
the frozen layer's own forward and backward. This suite measures ``optimizer.step()`` alone (the
forward and backward before it are not timed) on ``L`` independent LoRA layers of ``m × n`` with
rank ``r``, each fed its own ``N`` random input rows, float32:

* **ceilings**: the device's float32 matrix-product rate and copy bandwidth, against which
  ``benchmarks.cost_model`` turns each point's model flops and bytes into a floor time; the
  tables give the floor and its fraction of the measured time;
* **axes**: from a base point, one of ``m = n``, ``r``, ``N`` and ``L`` varies at a time;
* **target**: ``m = n = 4096, r = 16, N = 4096``, one layer, where LoRSum with one sweep should be
  at least 100× faster than SVDLoRA (issue #6), LoRA-Pro beside them;
* **e2e-minilm**: whole training steps (forward, backward, every optimizer's step) of the GLUE
  task's model, all-MiniLM-L6-v2 with PEFT LoRA r = 8 on query and value and a new head, on a batch
  of 32 × 128 random tokens, per method of ``lorsum compare --task glue``; the issue's target is
  LoRSum (1 sweep) ≤ 1.25× LoRA-AdamW on the CPU, ≤ 1.10× on a GPU;
* **e2e-smollm2**: the same for SmolLM2-135M with rank-16 LoRA on all seven linears of its 30
  blocks (210 adapters), 8 × 512 random tokens, bf16 autocast, the LM task's rates: for a GPU.
  Each method runs in its own fresh process, 10 measured steps: on a GPU this model's step is
  bound by the host's kernel launches, and in one shared process the frozen-adapter reference,
  measured 13th, took 1.32× LoRA-AdamW's step (measured first) although it does strictly less
  work. The target's methods are then also
  stepped in turn in one process, 20 rounds (``measure_interleaved``), and the target's verdict
  is the median over rounds of the ratio within a round: the ratio of separate medians varied
  from 0.91× to 1.44× between two leases of the same GPU. A run of this part cut short (by a
  device call's time limit) leaves a partial record that the same command, without
  ``--force``, goes on from: each method is measured in its own process either way.

For every point and method: the median wall time of the step over ``repeats`` steps after
``warmup`` (each after a fresh backward, device-synchronised around the step), the bytes held in
``optimizer.state``, and on a GPU the step's peak memory above what was allocated before it.
The end-to-end parts also run the capture-based methods with ``step_in_backward=True`` (method
names ending in ``-in-backward``) and record each method's peak memory over its training steps:
on a GPU the allocator's peak, on the CPU the process's peak resident set (``VmHWM``, reset
before each method), both also as the part above what was held before the first step (the
model and its inputs).

Run from the repository root::

    python -m benchmarks.step_cost [--device cpu|cuda] [--parts ceilings,axes,target,...]
                                   [--quick] [--force] [--out DIR]

Results go to ``benchmarks/results/step_cost/<part>-<device>.json`` (atomically, skipped when the
file holds the same config hash unless ``--force``); ``--quick`` runs tiny sizes into a temporary
directory, for the tests. A markdown table per part is printed to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorsum
from benchmarks import _results, cost_model
from benchmarks.optimizer_state import state_bytes

SUITE = "step_cost"
DEFAULT_OUT = _results.REPO_ROOT / "benchmarks" / "results" / SUITE
SPEEDUP_TARGET = 100.0  # LoRSum (1 sweep) against SVDLoRA at the target point
E2E_TARGET = {"cpu": 1.25, "cuda": 1.10}  # LoRSum (1 sweep) / AdamW-LoRA, whole training step
MEMORY_TARGET = 1.10  # LoRSum / AdamW-LoRA peak memory of a training step, no accumulation
PARTS = ("ceilings", "axes", "target", "stacking", "e2e-minilm", "e2e-smollm2")

# method -> (lorsum.create_optimizer name, hyperparameters). Learning rates are irrelevant to
# the cost; they are small so that repeated steps stay finite.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {"lr": 1e-4}),
    "precond-sgd": ("precond_sgd", {"lr": 1e-3}),
    "precond-adamw": ("precond_adamw", {"lr": 1e-4}),
    "lorsum-x0": ("lorsum", {"lr": 1e-3, "num_iters": 0}),
    "lorsum-x1": ("lorsum", {"lr": 1e-3, "num_iters": 1}),
    "lorsum-x3": ("lorsum", {"lr": 1e-3, "num_iters": 3}),
    "lorsum-x1-momentum": ("lorsum", {"lr": 1e-3, "num_iters": 1, "momentum": 0.9}),
    "lorsum-x3-momentum": ("lorsum", {"lr": 1e-3, "num_iters": 3, "momentum": 0.9}),
    "scaled-diagonal": ("scaled_lorsum", {"lr": 1e-3, "metric": "kfac"}),
    "scaled-dense": ("scaled_lorsum", {"lr": 1e-3, "metric": "kfac", "metric_form": "dense"}),
    "lora-pro": ("lora_pro", {"lr": 1e-4}),
    "svdlora": ("svdlora", {"lr": 1e-3}),
    "svdlora-gram": ("svdlora", {"lr": 1e-3, "svd": "gram"}),
}
# Methods that form or decompose m × n matrices: left out of the axes where m = n is large on
# a CPU (minutes per step), kept at the target point, which exists to show exactly that.
DENSE_METHODS = ("scaled-dense", "lora-pro", "svdlora", "svdlora-gram")
# The stacking part: each optimizer that stacks same-shape pairs, and the same one with
# foreach=False (this suffix), every pair stepped alone.
ALONE = "-alone"
STACKING_METHODS = (
    "lorsum-x1",
    "precond-sgd",
    "precond-adamw",
    "scaled-diagonal",
    "lora-pro",
    "svdlora",
    "svdlora-gram",
)


def part_configs(
    device: str, quick: bool, smollm2_weights: str = "pretrained"
) -> dict[str, dict[str, Any]]:
    """Every part's configuration (their hashes decide what is re-run)."""
    if quick:
        base = {"m": 32, "r": 4, "N": 64, "L": 2}
        axes = {"m": [16, 32], "r": [2, 4], "N": [32, 64], "L": [1, 2]}
        target = {"m": 64, "r": 4, "N": 64, "L": 1}
        repeats, warmup, dense_limit = 2, 1, 64
    else:
        base = {"m": 1024, "r": 16, "N": 2048, "L": 4}
        axes = {
            "m": [256, 1024, 2048, 4096],
            "r": [4, 16, 64],
            "N": [512, 2048, 8192],
            "L": [1, 4, 16],
        }
        target = {"m": 4096, "r": 16, "N": 4096, "L": 1}
        repeats, warmup = (5, 2) if device == "cuda" else (3, 1)
        dense_limit = 4096 if device == "cuda" else 1024
    common = {"device": device, "dtype": "float32", "repeats": repeats, "warmup": warmup}
    ceiling_matmul, ceiling_copy_mib = (8192, 2048) if device == "cuda" else (2048, 256)
    quick_e2e = [
        "lora-adamw", "lorsum-x1-nomom", "lorsum-x1-nomom" + NO_FACTOR_GRADS,
        "lorsum-x1-nomom-in-backward", "lorsum-x1-nomom" + IN_BACKWARD + BUCKETED, FROZEN,
    ]  # fmt: skip
    return {
        "ceilings": {
            **common, "part": "ceilings", "matmul_size": 256 if quick else ceiling_matmul,
            "copy_mib": 4 if quick else ceiling_copy_mib,
        },
        "axes": {
            **common, "part": "axes", "base": base, "axes": axes, "methods": list(METHODS),
            "dense_methods_up_to_m": dense_limit,
        },
        "stacking": {
            **common, "part": "stacking",
            "base": (
                {"m": 16, "r": 2, "N": 32, "L": 2} if quick
                else {"m": 256, "r": 16, "N": 512, "L": 4}
            ),
            "axes": {"L": [1, 2] if quick else [1, 4, 16, 64]},
            "methods": [m + suffix for m in STACKING_METHODS for suffix in ("", ALONE)],
            "repeats": 2 if quick else 7, "warmup": 1 if quick else 2,
        },
        "target": {
            **common, "part": "target", "points": [target],
            "methods": ["lorsum-x1", "lorsum-x1-momentum", "adamw", "lora-pro", "svdlora"],
        },
        "e2e-minilm": {
            **common, "part": "e2e-minilm", "batch": 4 if quick else 32,
            "seq_len": 16 if quick else 128,
            "methods": quick_e2e if quick else list(E2E_METHODS),
            "repeats": 2 if quick else 5,
        },
        "e2e-smollm2": {
            **common, "part": "e2e-smollm2", "batch": 2 if quick else 8,
            "seq_len": 16 if quick else 512, "rank": 4 if quick else 16, "autocast": "bfloat16",
            "weights": smollm2_weights,
            "methods": quick_e2e if quick else list(E2E_METHODS),
            "repeats": 2 if quick else 10, "isolated": not quick,
            "interleaved": list(INTERLEAVED), "rounds": 2 if quick else 20,
        },
    }  # fmt: skip


def points(config: dict[str, Any]) -> list[dict[str, int]]:
    """The shapes a part measures: the target points, or the base with one axis varied."""
    if config["part"] == "target":
        return list(config["points"])
    found: list[dict[str, int]] = []
    for axis, values in config["axes"].items():
        for value in values:
            point = {**config["base"], axis: value}
            if point not in found:
                found.append(point)
    return found


class _Layers(nn.Module):
    """``L`` independent ``n → m`` linears, each applied to its own input rows."""

    def __init__(self, m: int, n: int, count: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(n, m, bias=False) for _ in range(count))

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x) for layer, x in zip(self.layers, inputs, strict=True)]


def measure(method: str, point: dict[str, int], config: dict[str, Any]) -> dict[str, Any]:
    """Time ``optimizer.step()`` of ``method`` at one shape ``point`` (``m = n``)."""
    device = torch.device(config["device"])
    m, r, N, L = point["m"], point["r"], point["N"], point["L"]
    torch.manual_seed(0)
    model = _Layers(m, m, L).to(device)
    lorsum.add_lora(model, [f"layers.{i}" for i in range(L)], rank=r)
    with torch.no_grad():  # a non-zero B, as after the first steps of training
        for pair in lorsum.find_lora_pairs(model):
            pair.B.normal_(std=0.01)
    name, hparams = METHODS[method.removesuffix(ALONE)]
    if method.endswith(ALONE):
        hparams = {**hparams, "foreach": False}
    optimizer = lorsum.create_optimizer(model, name, dense=False, **hparams)
    inputs = [torch.randn(N, m, device=device) for _ in range(L)]
    directions = [torch.randn(N, m, device=device) / N for _ in range(L)]
    times, peaks = [], []
    for step in range(config["warmup"] + config["repeats"]):
        optimizer.zero_grad(set_to_none=True)
        outputs = model(inputs)
        sum((y * d).sum() for y, d in zip(outputs, directions, strict=True)).backward()
        del outputs
        _synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        optimizer.step()
        _synchronize(device)
        elapsed = time.perf_counter() - start
        if step >= config["warmup"]:
            times.append(elapsed)
            if device.type == "cuda":
                peaks.append(torch.cuda.max_memory_allocated(device) - before)
    if getattr(optimizer, "capture", None) is not None:
        optimizer.capture.remove()
    return {
        "method": method,
        **point,
        "step_time_s": _results.time_stats(times),
        "state_bytes": state_bytes(optimizer),
        "step_peak_extra_bytes": max(peaks) if peaks else None,
        "sweep_flops": 4 * r * N * (m + m) * L,  # one sweep over the gradient rows, all layers
        "layer_flops": 4 * N * m * m * L,  # the frozen layers' forward and input-gradient
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


IN_BACKWARD = "-in-backward"  # suffix of an e2e method stepped with step_in_backward=True
NO_FACTOR_GRADS = "-no-factor-grads"  # suffix: its capture has factor_grads=False
# Suffix after IN_BACKWARD: pairs stepped in backward in stacked buckets of BACKWARD_BUCKET
# (five SmolLM2 blocks' adapters; MiniLM's 12 make one bucket, flushed when backward ends).
BUCKETED = "-bucketed"
BACKWARD_BUCKET = 35


# Not a method: the adapters' forward and backward with A and B frozen, so autograd computes
# no gradient for them and nothing is stepped. Against LoRA-AdamW it bounds what skipping the
# factor gradients (which LoRSum does not use) could save at most.
FROZEN = "frozen-adapters"
# The end-to-end parts' methods, the slowest last: a run cut short by a time limit has measured
# the most methods.
E2E_METHODS = (
    "lora-adamw", "lorsum-x1-nomom", "lorsum-x1-nomom" + NO_FACTOR_GRADS,
    "lorsum-x1-nomom-in-backward", "lorsum-x1-nomom" + NO_FACTOR_GRADS + IN_BACKWARD,
    "lorsum-x1-nomom" + IN_BACKWARD + BUCKETED, "lorsum-x1", "lorsum-x1" + NO_FACTOR_GRADS,
    "lorsum-x1-in-backward", "lorsum-x8", "precond-adamw", "scaled-kfac", "full-adamw",
    FROZEN, "lora-pro", "svdlora",
)  # fmt: skip


# The target's methods, also stepped in turn in one process (see measure_interleaved); the first
# is the reference of the ratios.
INTERLEAVED = ("lora-adamw", "lorsum-x1-nomom", "lorsum-x1-nomom" + NO_FACTOR_GRADS, FROZEN)


def _base_method(method: str) -> str:
    """The task's method behind an e2e method name (without its suffixes)."""
    if method == FROZEN:
        return "lora-adamw"
    return method.removesuffix(BUCKETED).removesuffix(IN_BACKWARD).removesuffix(NO_FACTOR_GRADS)


def measure_e2e(method: str, config: dict[str, Any]) -> dict[str, Any]:
    """Time whole training steps (zero_grad, forward, backward, step) of one model and method.

    The peak memory covers every step, warm-up included (the first step creates the state).
    """
    device = torch.device(config["device"])
    torch.manual_seed(0)
    optimizers, loss_fn = _E2E_MODELS[config["part"]](method, config, device)
    memory = _PeakMemory(device)
    times, step_times = [], []
    for step in range(config["warmup"] + config["repeats"]):
        _synchronize(device)
        start = time.perf_counter()
        optimizers.zero_grad()
        loss_fn().backward()
        _synchronize(device)  # splits the step into backward and optimizer.step()
        middle = time.perf_counter()
        optimizers.step()
        _synchronize(device)
        if step >= config["warmup"]:
            times.append(time.perf_counter() - start)
            step_times.append(time.perf_counter() - middle)
    peak_bytes, peak_above_setup_bytes = memory.read()
    optimizers.close()
    return {
        "method": method,
        "step_time_s": _results.time_stats(times),
        "optimizer_step_time_s": _results.time_stats(step_times),
        "state_bytes": sum(state_bytes(o) for o in optimizers.optimizers),
        "peak_bytes": peak_bytes,
        "peak_above_setup_bytes": peak_above_setup_bytes,
    }


def in_fresh_process(function: Callable[[Any, dict], dict], method: Any, config: dict) -> dict:
    """``function(method, config)`` in a new (spawned) process with this one's thread count.

    ``function`` must be importable by name (a module-level function) for the child to find it.
    """
    context = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        job = pool.submit(_with_threads, torch.get_num_threads(), function, method, config)
        return job.result()


def _with_threads(threads: int, function: Callable[[Any, dict], dict], *args: Any) -> dict:
    torch.set_num_threads(threads)  # a spawned child would pick its own default
    return function(*args)


def measure_interleaved(methods: Sequence[str], config: dict[str, Any]) -> dict[str, Any]:
    """Whole training steps of several methods taken in turn, in one process.

    Every method gets its own model and optimizers; each round steps every method once, in an
    order rotated from round to round, after ``warmup`` rounds. Whatever slows the host during
    a round (another tenant, a clock change) then slows every method of that round alike, so
    the ratio of two methods' times within one round is far steadier than the ratio of their
    separate medians, which on a shared GPU machine varied by a factor of 1.6 between leases.
    Returns each method's step times and, per method, the median over rounds of its time
    divided by the first method's in the same round.
    """
    device = torch.device(config["device"])
    models = {}
    for method in methods:
        torch.manual_seed(0)
        models[method] = _E2E_MODELS[config["part"]](method, config, device)
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_ in range(config["warmup"] + config["rounds"]):
        shift = round_ % len(methods)
        for method in [*methods[shift:], *methods[:shift]]:
            optimizers, loss_fn = models[method]
            _synchronize(device)
            start = time.perf_counter()
            optimizers.zero_grad()
            loss_fn().backward()
            optimizers.step()
            _synchronize(device)
            if round_ >= config["warmup"]:
                times[method].append(time.perf_counter() - start)
    for optimizers, _ in models.values():
        optimizers.close()
    reference = times[methods[0]]
    return {
        "methods": list(methods),
        "step_time_s": {method: _results.time_stats(t) for method, t in times.items()},
        "over_first_per_round": {
            method: [a / b for a, b in zip(t, reference, strict=True)]
            for method, t in times.items()
        },
        "median_over_first": {
            method: statistics.median(a / b for a, b in zip(t, reference, strict=True))
            for method, t in times.items()
        },
    }


def _warm_then_measure_e2e(method: str, config: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure_e2e` after one discarded step (one-time allocations, kernel caches)."""
    measure_e2e(method, {**config, "repeats": 1, "warmup": 0})
    return measure_e2e(method, config)


class _PeakMemory:
    """Peak memory from now on: the CUDA allocator's, or the process's resident set on Linux.

    On the CPU the kernel's high-water mark ``VmHWM`` is reset (``_results.reset_peak_rss``);
    freed heap memory is first handed back to the kernel (``malloc_trim``), so that later
    allocations show in the resident set instead of silently reusing pages of an earlier
    method. Where that is unavailable the peak is ``None``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.setup: int | None = torch.cuda.memory_allocated(device)
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.setup = _results.current_rss_bytes() if _results.reset_peak_rss() else None

    def read(self) -> tuple[int | None, int | None]:
        """``(peak, peak - setup)`` in bytes, or ``(None, None)``."""
        if self.setup is None:
            return None, None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _results.peak_rss_bytes()
        return peak, peak - self.setup


# Imported inside the builders: the other parts need neither transformers nor the models.


def _minilm_for_glue(method: str, config: dict[str, Any], device: torch.device) -> tuple:
    """The GLUE task's model (MiniLM, LoRA on query/value, a new head) and a random batch."""
    from benchmarks.pretrained import load_minilm
    from benchmarks.tasks import _finetune, glue

    model, _ = load_minilm("sequence-classification", num_labels=2)
    model = _finetune.prepare(
        model,
        _base_method(method),
        glue.TARGETS,
        glue.RANK,
        modules_to_save=["classifier"],
    )
    model.to(device).train()
    optimizers = _e2e_optimizers(
        model, method, lambda base: glue.default_learning_rate("sst2", base)
    )
    ids, generator = _random_tokens(model, config, device)
    labels = torch.randint(0, 2, (config["batch"],), generator=generator).to(device)

    def loss() -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    return optimizers, loss


def _smollm2_all_linears(method: str, config: dict[str, Any], device: torch.device) -> tuple:
    """SmolLM2-135M with rank-16 LoRA on all seven linears of every block, bf16 autocast.

    ``config["weights"]``: ``"pretrained"`` (the GGUF file) or ``"random"`` (the same
    architecture, random weights: the same cost, for a machine without the file).
    """
    from benchmarks import pretrained
    from benchmarks.tasks import _finetune, lm

    if config.get("weights", "pretrained") == "random":
        model, _ = pretrained.random_smollm2()
    else:
        model, _ = pretrained.load_smollm2()
    model = _finetune.prepare(model, _base_method(method), SMOLLM2_TARGETS, config["rank"])
    model.to(device).train()
    optimizers = _e2e_optimizers(
        model, method, lambda base: lm.default_learning_rate(lm.VARIANTS[0], base)
    )
    ids, _ = _random_tokens(model, config, device)

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss

    return optimizers, loss


def _e2e_optimizers(model: nn.Module, method: str, learning_rate: Any) -> Any:
    """The task's optimizers of ``method``; ``<method>-in-backward`` steps in backward (in
    stacked buckets with ``-bucketed``) and ``<method>-no-factor-grads`` lets autograd skip the
    factors' gradients."""
    from benchmarks.tasks import _finetune

    base = _base_method(method)
    if method == FROZEN:
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(False)
        # The embeddings' output requires grad, so that backward still runs through every
        # layer as it does when training LoRA (else it would stop at the head, if any).
        model.enable_input_require_grads()
        return _NoStep()
    overrides: dict[str, Any] = {"step_in_backward": True} if IN_BACKWARD in method else {}
    if method.endswith(BUCKETED):
        overrides["backward_bucket"] = BACKWARD_BUCKET
    if NO_FACTOR_GRADS in method:
        overrides["factor_grads"] = False
    return _finetune.Optimizers(model, base, learning_rate(base), overrides=overrides)


class _NoStep:
    """The optimizers of ``FROZEN``: nothing is stepped (a head still gets its gradient)."""

    optimizers: tuple[torch.optim.Optimizer, ...] = ()

    def zero_grad(self) -> None:
        pass

    def step(self) -> None:
        pass

    def close(self) -> None:
        pass


def _random_tokens(model: nn.Module, config: dict[str, Any], device: torch.device) -> tuple:
    generator = torch.Generator().manual_seed(0)
    shape = (config["batch"], config["seq_len"])
    ids = torch.randint(1, model.config.vocab_size, shape, generator=generator)
    return ids.to(device), generator


SMOLLM2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_E2E_MODELS = {"e2e-minilm": _minilm_for_glue, "e2e-smollm2": _smollm2_all_linears}


def measure_ceilings(config: dict[str, Any]) -> dict[str, Any]:
    """The device's float32 matrix-product rate and copy bandwidth: the cost model's ceilings.

    A square product of ``matmul_size`` (``2 s³`` operations) and a clone of ``copy_mib`` MiB
    (its bytes read plus written), each the median of ``repeats`` after ``warmup``.
    """
    device = torch.device(config["device"])
    size = config["matmul_size"]
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    source = torch.randn(config["copy_mib"] * 2**18, device=device)  # 2**18 floats per MiB
    products, copies = [], []
    for step in range(config["warmup"] + config["repeats"]):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        middle = time.perf_counter()
        source.clone()
        _synchronize(device)
        if step >= config["warmup"]:
            products.append(middle - start)
            copies.append(time.perf_counter() - middle)
    product_s = _results.time_stats(products)["median_s"]
    copy_s = _results.time_stats(copies)["median_s"]
    return {
        "matmul_flops_per_s": 2 * size**3 / product_s,
        "copy_bytes_per_s": 2 * source.numel() * source.element_size() / copy_s,
        "matmul_time_s": _results.time_stats(products),
        "copy_time_s": _results.time_stats(copies),
    }


def with_cost_model(result: dict[str, Any], ceilings: dict[str, Any] | None) -> dict[str, Any]:
    """``result`` of an axes or target point with its model flops, bytes, floor and fraction."""
    m, r, N, L = result["m"], result["r"], result["N"], result["L"]
    # The model counts the same work whether the pairs are stepped alone or stacked.
    cost = cost_model.step_cost(result["method"].removesuffix(ALONE), m, m, r, N) * L
    out = {**result, "model_flops": cost.flops, "model_bytes": cost.bytes}
    if ceilings is not None:
        floor = cost.floor_s(ceilings["matmul_flops_per_s"], ceilings["copy_bytes_per_s"])
        out["floor_s"] = floor
        out["fraction_of_floor"] = floor / result["step_time_s"]["median_s"]
    return out


def run_part(config: dict[str, Any], progress: Path | None = None) -> dict[str, Any]:
    """Measure one part. ``progress``: where the finished methods of a long part are written
    after each one (a partial record), so that a run cut short keeps what it measured; an
    ``isolated`` part found there with the same config goes on after its finished methods."""
    start = time.perf_counter()
    if config["part"] == "ceilings":
        results = [measure_ceilings(config)]
        return _record(config, results, time.perf_counter() - start)
    if config["part"] in _E2E_MODELS:
        # One discarded run first: the process's one-time allocations (kernel workspaces, the
        # autograd engine's threads, the model's file cache) would otherwise be charged to
        # whichever method comes first.
        # With ``isolated``, each method gets a fresh process instead, so that nothing one
        # method leaves behind (allocator pools, autograd and Python garbage, a warmed cache)
        # changes the next one's times: on a GPU a step of a model with hundreds of adapters is
        # bound by the host's launches, which such leftovers slow.
        isolated = config.get("isolated", False)
        if not isolated:
            _log(f"{config['part']}: warm-up with {config['methods'][0]} (discarded)")
            measure_e2e(config["methods"][0], {**config, "repeats": 1, "warmup": 0})
        results, resumed = [], []
        if isolated and progress is not None:
            # Each method has its own process, so a run cut short (by a device call's time
            # limit, say) can go on from its partial record with nothing lost or skewed.
            partial = _results.load_current(progress, config)
            if partial is not None and partial.get("partial"):
                results = list(partial["results"])
                resumed = [r["method"] for r in results]
                start -= partial["wall_time_s"]
                _log(f"{config['part']}: resuming {progress} after {', '.join(resumed)}")
        for method in config["methods"]:
            if method in resumed:
                continue
            _log(f"{config['part']}: {method}{' (own process)' if isolated else ''}")
            measured = (
                in_fresh_process(_warm_then_measure_e2e, method, config)
                if isolated
                else measure_e2e(method, config)
            )
            results.append(measured)
            _write_progress(progress, config, results, start)
        record = _record(config, results, time.perf_counter() - start)
        if config.get("interleaved"):
            methods = config["interleaved"]
            _log(f"{config['part']}: {', '.join(methods)} in turn")
            interleaved = (
                in_fresh_process(measure_interleaved, methods, config)
                if isolated
                else measure_interleaved(methods, config)
            )
            record = _record(config, results, time.perf_counter() - start, interleaved)
        if resumed:
            record["resumed_methods"] = resumed  # measured by an earlier invocation, kept
        return record
    results = []
    for point in points(config):
        for method in config["methods"]:
            limit = config.get("dense_methods_up_to_m")
            if limit is not None and method in DENSE_METHODS and point["m"] > limit:
                continue
            _log(f"{config['part']}: {method} at {point}")
            results.append(measure(method, point, config))
        _write_progress(progress, config, results, start)
    return _record(config, results, time.perf_counter() - start)


def _write_progress(
    progress: Path | None, config: dict[str, Any], results: list[dict[str, Any]], start: float
) -> None:
    """The record so far, marked partial (the complete one replaces it, see ``main``)."""
    if progress is not None:
        partial = _record(config, results, time.perf_counter() - start)
        _results.write_json_atomic(progress, {**partial, "partial": True})


def _record(
    config: dict[str, Any],
    results: list[dict[str, Any]],
    wall_time_s: float,
    interleaved: dict[str, Any] | None = None,
) -> dict:
    record = _results.make_record(
        suite=SUITE,
        part=config["part"],
        config=config,
        device=_device_name(config["device"]),
        dtype=config["dtype"],
        seeds=(0,),
        wall_time_s=wall_time_s,
        results=results,
        summary=_summary(config, results),
        notes={
            "step_time_s": "optimizer.step() alone, synchronised, after a fresh backward each",
            "state_bytes": "bytes of every tensor in optimizer.state after the steps",
            "step_peak_extra_bytes": "CUDA only: peak allocation during step() above before it",
            "sweep_flops": "4·r·N·(m+n)·L, one LoRSum sweep's products with the captured rows",
            "layer_flops": "4·N·m·n·L, the frozen layers' forward and input-gradient products",
            "peak_bytes": "e2e: peak over the training steps, CUDA allocator or CPU VmHWM",
            "peak_above_setup_bytes": "e2e: peak_bytes minus what was held before the first step",
            "optimizer_step_time_s": "e2e: optimizer.step() alone, synchronised after backward",
            "interleaved": "e2e: methods stepped in turn in one process (measure_interleaved)",
        },
    )
    if interleaved is not None:
        record["interleaved"] = interleaved
        ratios = interleaved["median_over_first"]
        if interleaved["methods"][0] == "lora-adamw" and "lorsum-x1-nomom" in ratios:
            # The target's verdict: the ratio within rounds, steadier than that of the medians.
            ratio = ratios["lorsum-x1-nomom"]
            record["summary"].update(
                interleaved_lorsum_x1_over_lora_adamw=ratio,
                met=ratio <= E2E_TARGET[config["device"]],
            )
    return record


def _summary(config: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    if config["part"] in _E2E_MODELS:
        by_method = {r["method"]: r["step_time_s"]["median_s"] for r in results}
        summary: dict[str, Any] = {"median_step_s": by_method}
        if {"lora-adamw", "lorsum-x1-nomom"} <= set(by_method):  # a partial run may lack them
            ratio = by_method["lorsum-x1-nomom"] / by_method["lora-adamw"]
            target = E2E_TARGET[config["device"]]
            summary.update(lorsum_x1_over_lora_adamw=ratio, target=target, met=ratio <= target)
        if {"lora-adamw", "lorsum-x1-nomom" + NO_FACTOR_GRADS} <= set(by_method):
            summary["lorsum_x1_no_factor_grads_over_lora_adamw"] = (
                by_method["lorsum-x1-nomom" + NO_FACTOR_GRADS] / by_method["lora-adamw"]
            )
        if {"lora-adamw", "lorsum-x1-nomom" + IN_BACKWARD} <= set(by_method):
            summary["lorsum_x1_in_backward_over_lora_adamw"] = (
                by_method["lorsum-x1-nomom" + IN_BACKWARD] / by_method["lora-adamw"]
            )
        if {"lora-adamw", "lorsum-x1-nomom" + IN_BACKWARD + BUCKETED} <= set(by_method):
            summary["lorsum_x1_in_backward_bucketed_over_lora_adamw"] = (
                by_method["lorsum-x1-nomom" + IN_BACKWARD + BUCKETED] / by_method["lora-adamw"]
            )
        peaks = {r["method"]: r.get("peak_bytes") for r in results}
        above = {r["method"]: r.get("peak_above_setup_bytes") for r in results}
        if peaks.get("lora-adamw"):
            summary["peak_bytes"] = peaks
            summary["peak_above_setup_bytes"] = above
            summary["peak_over_lora_adamw"] = {
                m: p / peaks["lora-adamw"] for m, p in peaks.items() if p is not None
            }
            summary["peak_above_setup_over_lora_adamw"] = {
                m: a / above["lora-adamw"] for m, a in above.items() if a is not None
            }
            summary["memory_target"] = MEMORY_TARGET
        return summary
    if config["part"] == "stacking":
        # Pair by pair over stacked, per method and layer count: what stacking saves.
        times = {(r["method"], r["L"]): r["step_time_s"]["median_s"] for r in results}
        speedup: dict[str, dict[str, float]] = {}
        for (method, L), alone in times.items():
            stacked = times.get((method.removesuffix(ALONE), L))
            if method.endswith(ALONE) and stacked:
                speedup.setdefault(method.removesuffix(ALONE), {})[str(L)] = alone / stacked
        return {"alone_over_stacked": speedup}
    if config["part"] != "target":
        return {}
    by_method = {r["method"]: r["step_time_s"]["median_s"] for r in results}
    if not {"svdlora", "lorsum-x1"} <= set(by_method):  # a partial run
        return {"median_step_s": by_method}
    speedup = by_method["svdlora"] / by_method["lorsum-x1"]
    return {
        "median_step_s": by_method,
        "svdlora_over_lorsum_x1": speedup,
        "target": SPEEDUP_TARGET,
        "met": speedup >= SPEEDUP_TARGET,
    }


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return _results.cpu_model() or "cpu"


def table(record: dict[str, Any], ceilings: dict[str, Any] | None = None) -> str:
    """Median step time (ms) per method and point, the state size, and the cost model's floor.

    ``ceilings``: the device's ``ceilings`` result (its matrix rate and bandwidth), if measured.
    """
    title = f"### {record['part']} ({record['device']})\n\n"
    if record["part"] == "ceilings":
        c = record["results"][0]
        return title + _results.markdown_table(
            ["float32 matrix product (GFLOP/s)", "copy bandwidth (GB/s)"],
            [[f"{c['matmul_flops_per_s'] / 1e9:.0f}", f"{c['copy_bytes_per_s'] / 1e9:.1f}"]],
        )
    if record["part"] in _E2E_MODELS:
        base = record["summary"]["median_step_s"]["lora-adamw"]
        above = {r["method"]: r.get("peak_above_setup_bytes") for r in record["results"]}
        rows = [
            [
                r["method"], f"{1e3 * r['step_time_s']['median_s']:.1f}",
                f"{r['step_time_s']['median_s'] / base:.2f}", f"{r['state_bytes'] / 2**20:.2f}",
                _mib(r["peak_bytes"]), _mib(above[r["method"]]),
                _ratio(above[r["method"]], above.get("lora-adamw")),
            ]
            for r in record["results"]
        ]  # fmt: skip
        headers = [
            "method", "step (ms)", "/ lora-adamw", "state (MiB)", "peak (MiB)",
            "peak above setup (MiB)", "/ lora-adamw",
        ]  # fmt: skip
        return title + _results.markdown_table(headers, rows)
    results = [with_cost_model(r, ceilings) for r in record["results"]]
    rows = [
        [
            r["method"], f"{r['m']}", f"{r['r']}", f"{r['N']}", f"{r['L']}",
            f"{1e3 * r['step_time_s']['median_s']:.2f}", f"{r['state_bytes'] / 2**20:.2f}",
            _mib(r["step_peak_extra_bytes"]), f"{r['model_flops'] / 1e9:.3g}",
            f"{1e3 * r['floor_s']:.3g}" if "floor_s" in r else "",
            f"{r['fraction_of_floor']:.2f}" if "fraction_of_floor" in r else "",
        ]
        for r in results
    ]  # fmt: skip
    headers = [
        "method", "m = n", "r", "N", "L", "step (ms)", "state (MiB)", "step peak (MiB)",
        "model GFLOP", "floor (ms)", "floor / step",
    ]  # fmt: skip
    return title + _results.markdown_table(headers, rows)


def _mib(size: int | None) -> str:
    return "" if size is None else f"{size / 2**20:.1f}"


def _ratio(value: int | None, base: int | None) -> str:
    return "" if value is None or not base else f"{value / base:.2f}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plot(record: dict[str, Any], path: Path) -> bool:
    """A figure of one part: step time against ``m = n`` (axes) or the e2e ratios; False if none.

    Axes: median ``optimizer.step()`` time per method along the ``m`` axis, log-log. End to end:
    each method's training-step time and peak memory above setup, over LoRA-AdamW's.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.plots import save_figure

    if record["part"] == "axes":
        base = record["config"]["base"]
        along_m = [
            r for r in record["results"]
            if all(r[k] == base[k] for k in ("r", "N", "L"))
        ]  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, method in enumerate(record["config"]["methods"]):
            points = sorted((r["m"], r["step_time_s"]["median_s"]) for r in along_m
                            if r["method"] == method)  # fmt: skip
            if points:  # ten colours, then the same ones dashed: every method told apart
                style = {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}
                ax.plot(*zip(*points, strict=True), marker="o", label=method, **style)
        ax.set(xscale="log", yscale="log", xlabel="m = n", ylabel="optimizer.step() (s)")
        ax.set_title(
            f"step time, r={base['r']}, N={base['N']}, L={base['L']} ({record['device']})",
            fontsize=9,
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        save_figure(fig, path)
        return True
    if record["part"] not in _E2E_MODELS:
        return False
    results = record["results"]
    methods = [r["method"] for r in results]
    base = next(r for r in results if r["method"] == "lora-adamw")
    times = [r["step_time_s"]["median_s"] / base["step_time_s"]["median_s"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    axes[0].barh(methods, times)
    axes[0].set_xlabel("training-step time / LoRA-AdamW")
    if base.get("peak_above_setup_bytes"):
        peak = [r["peak_above_setup_bytes"] / base["peak_above_setup_bytes"] for r in results]
        axes[1].barh(methods, peak, color="tab:orange")
    axes[1].set_xlabel("peak memory above setup / LoRA-AdamW")
    for ax in axes:
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.grid(alpha=0.3, axis="x")
    axes[0].invert_yaxis()
    fig.suptitle(f"{record['part']} ({record['device']})", fontsize=10)
    save_figure(fig, path)
    return True


def _stored_ceilings(out: Path, device: str) -> dict[str, Any] | None:
    """The device's measured ceilings from ``out``, if that part was run."""
    try:
        record = json.loads((out / f"ceilings-{device}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record["results"][0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_cost", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}"
    )
    parser.add_argument("--force", action="store_true", help="re-run parts stored already")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG figures")
    parser.add_argument(
        "--summarize-only", action="store_true",
        help="measure nothing: print the tables and draw the figures of the stored results "
        "(for example a GPU's, on a machine without one); fails if a part is missing",
    )  # fmt: skip
    parser.add_argument(
        "--smollm2-weights", choices=("pretrained", "random"), default="pretrained",
        help="e2e-smollm2: the GGUF file's weights, or the same architecture with random weights "
        "(same cost; for a machine without the model file)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    args = parser.parse_args(argv)
    if args.quick and args.out is not None and args.out.resolve() == DEFAULT_OUT:
        parser.error("--quick results must not overwrite the committed results; pick another --out")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.summarize_only:
        parser.error("--device cuda: no CUDA device is available")
    args.parts = [p for p in args.parts.split(",") if p]
    if unknown := sorted(set(args.parts) - set(PARTS)):
        parser.error(f"unknown part(s): {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or (
        Path(tempfile.mkdtemp(prefix=f"lorsum-{SUITE}-")) if args.quick else DEFAULT_OUT
    )
    configs = part_configs(args.device, args.quick, args.smollm2_weights)
    parts = sorted(args.parts, key=PARTS.index)  # the ceilings first: the tables use them
    for part in parts:
        path = out / f"{part}-{args.device}.json"
        progress = path.with_suffix(".partial.json")
        if args.force:  # a fresh run: neither the record nor a partial one is kept
            progress.unlink(missing_ok=True)
        record = None if args.force else _results.load_current(path, configs[part])
        if record is None and args.summarize_only:
            _log(f"{part}: {path} is missing or was made with another config (--summarize-only)")
            return 1
        if record is None:
            record = run_part(configs[part], progress)
            _results.write_json_atomic(path, record)
            progress.unlink(missing_ok=True)
            _log(f"{part}: wrote {path} ({record['wall_time_s']:.1f} s)")
        else:
            _log(f"{part}: {path} has the same config hash, skipped (--force re-runs it)")
        print(table(record, _stored_ceilings(out, args.device)), end="\n\n")
        figure = out / f"{part}-{args.device}.png"
        if not args.no_plot and plot(record, figure):
            _log(f"{part}: plotted {figure}")
        summary = record["summary"]
        verdict = "met" if summary.get("met") else "missed"
        if "svdlora_over_lorsum_x1" in summary:
            print(
                f"SVDLoRA / LoRSum(1 sweep) step time: {summary['svdlora_over_lorsum_x1']:.1f}x "
                f"(target {summary['target']:g}x: {verdict})\n"
            )
        if "interleaved_lorsum_x1_over_lora_adamw" in summary:
            print(
                "LoRSum(1 sweep) / LoRA-AdamW training step, stepped in turn: "
                f"{summary['interleaved_lorsum_x1_over_lora_adamw']:.2f}x (median over rounds; "
                f"target <= {summary['target']:g}x: {verdict})"
            )
        if "lorsum_x1_over_lora_adamw" in summary:
            verdict_here = "" if "interleaved" in record else f"; target: {verdict}"
            print(
                "LoRSum(1 sweep) / LoRA-AdamW training step, separate medians: "
                f"{summary['lorsum_x1_over_lora_adamw']:.2f}x{verdict_here}; stepped in backward: "
                f"{summary.get('lorsum_x1_in_backward_over_lora_adamw', float('nan')):.2f}x; "
                "without factor gradients: "
                f"{summary.get('lorsum_x1_no_factor_grads_over_lora_adamw', float('nan')):.2f}x\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
