"""How many LM training steps per second several processes sharing one GPU get, all together.

The harness fills a leased GPU with ``lorsum compare --jobs N``: N processes, each training one
run. Whether N processes get N times one process's throughput, or take turns on the GPU, decides
how many runs a lease holds, and whether a multi-process service (NVIDIA MPS, which lets the
kernels of several processes run at once) would help. This probe measures it::

    python -m benchmarks.throughput_probe --procs 1,3,6 --seconds 60 --device cuda [--out FILE]

Each process builds SmolLM2-135M's architecture with random weights
(``pretrained.random_smollm2``: a step's time does not depend on the weights' values), adds the
LM task's adapters (rank-8 LoRA on ``q_proj`` and ``v_proj``) and trains them with one method's
optimizer (``--method``, LoRA-AdamW by default) on random tokens, ``--batch`` blocks of
``--seq-len`` tokens a step as the LM task's full size does. After ``--warmup`` steps, the
processes wait for each other, then count the steps they finish in ``--seconds``. Run it once
as it is and once under the MPS daemon (``nvidia-cuda-mps-control -d``) to compare.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import _cli, _results, pretrained
from benchmarks.tasks import _finetune, lm

__all__ = ["main", "measure"]


def measure(
    procs: int, *, seconds: float, device: str, batch: int, seq_len: int, warmup: int, method: str
) -> dict[str, Any]:
    """``procs`` processes training at once: each one's steps per second, and their sum."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    barrier, queue = context.Barrier(procs), context.Queue()
    threads = max(1, (os.cpu_count() or 1) // procs)
    settings = (seconds, device, batch, seq_len, warmup, method, threads)
    workers = [
        context.Process(target=_train, args=(settings, barrier, queue)) for _ in range(procs)
    ]
    for worker in workers:
        worker.start()
    outcomes = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise RuntimeError(f"{len(errors)} of {procs} probe processes failed: {errors[0]}")
    rates = sorted(o["steps"] / o["seconds"] for o in outcomes)
    return {"procs": procs, "steps_per_s": rates, "total_steps_per_s": sum(rates)}


def _train(settings: tuple[Any, ...], barrier: Any, queue: Any) -> None:
    seconds, device, batch, seq_len, warmup, method, threads = settings
    try:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model, _ = pretrained.random_smollm2()
        model = _finetune.prepare(model, method, lm.TARGETS, lm.RANK).to(device)
        optimizers = _finetune.Optimizers(model, method, 1e-4)
        vocab = model.config.vocab_size
        tokens = torch.randint(vocab, (batch, seq_len), device=device)

        def step() -> None:  # the LM task's step, its loss logging (a wait for the GPU) too
            optimizers.zero_grad()
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
            float(loss.detach())
            loss.backward()
            optimizers.step()

        model.train()
        for _ in range(warmup):
            step()
        barrier.wait()
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            step()
            steps += 1
        queue.put({"steps": steps, "seconds": time.perf_counter() - start})
    except Exception as error:  # the parent reports it; a hung barrier would hide it
        barrier.abort()
        queue.put({"error": f"{type(error).__name__}: {error}"})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput_probe",
        description="Steps per second of several processes training SmolLM2-135M's architecture "
        "(random weights, the LM task's adapters) at once on one device.",
    )
    parser.add_argument(
        "--procs", type=_counts, default=[1, 3, 6], help="process counts (default: 1,3,6)"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="counted seconds (default: 60)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--batch", type=_cli.positive_int, default=8, help="blocks (default: 8)")
    parser.add_argument(
        "--seq-len", type=_cli.positive_int, default=512, help="tokens a block (default: 512)"
    )
    parser.add_argument(
        "--warmup", type=_cli.non_negative_int, default=3, help="uncounted steps (default: 3)"
    )
    parser.add_argument(
        "--method",
        choices=[m for m in _finetune.METHODS if m != "full-adamw"],
        default="lora-adamw",
        help="whose optimizer steps the adapters (default: lora-adamw)",
    )
    parser.add_argument(
        "--label", default="", help="what this run stands for in --out, e.g. 'under MPS'"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error(f"--seconds {args.seconds}: must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    results = []
    for procs in args.procs:
        result = measure(
            procs, seconds=args.seconds, device=args.device, batch=args.batch,
            seq_len=args.seq_len, warmup=args.warmup, method=args.method,
        )  # fmt: skip
        results.append(result)
        each = ", ".join(f"{rate:.2f}" for rate in result["steps_per_s"])
        print(f"{procs} processes: {result['total_steps_per_s']:.2f} steps/s in all ({each})")
    if args.out is not None:
        record = {
            "environment": _results.environment(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "settings": {k: str(v) if k == "out" else v for k, v in vars(args).items()},
            "results": results,
        }
        _results.write_json_atomic(args.out, record)
    return 0


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"Invalid process counts {text!r}: e.g. 1,3,6")
    return counts


if __name__ == "__main__":
    raise SystemExit(main())
