"""Bytes all-reduced per step and layer under DDP: LoRSum's reductions vs DDP-AdamW-LoRA's.

    python -m benchmarks.comm_volume [--out DIR] [--quick]

Two gloo processes on CPU train one LoRA layer ``(m, n, r)`` (float32) for a few steps. For each
method the optimizer's own all-reduce payload is read from its reducer's ``bytes_reduced``
counter and DDP's from a communication hook that counts each gradient bucket; both are compared
with the closed forms of ``docs/distributed.md``. The capture-based methods run with
``factor_grads=False`` (DDP then has no LoRA ``.grad`` to average, so the optimizer's bytes are
the whole story) and with the default ``factor_grads=True`` (DDP also all-reduces ``.grad``).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lorsum
from benchmarks import _results

DEFAULT_OUT = _results.REPO_ROOT / "benchmarks" / "results" / "comm_volume"
WORLD, STEPS, ROWS = 2, 3, 64
FLOAT = 4  # bytes of a float32, the compute dtype of every reduction here

# (name, method, hyperparameters, bytes per step and layer as a function of m, n, r)
METHODS: list[tuple[str, str, dict[str, Any], Any]] = [
    ("lorsum-k0", "lorsum", {"num_iters": 0}, lambda m, n, r: (m + n) * r * FLOAT),
    ("lorsum-k1", "lorsum", {"num_iters": 1}, lambda m, n, r: (m + n) * r * FLOAT),
    ("lorsum-k2", "lorsum", {"num_iters": 2}, lambda m, n, r: 2 * (m + n) * r * FLOAT),
    ("lorsum-k4", "lorsum", {"num_iters": 4}, lambda m, n, r: 4 * (m + n) * r * FLOAT),
    (
        "lorsum-k1-momentum",
        "lorsum",
        {"num_iters": 1, "momentum": 0.9},
        lambda m, n, r: 2 * (m + n) * r * FLOAT,
    ),
    (
        "scaled-kfac-diagonal-k1",
        "scaled_lorsum",
        {"num_iters": 1, "betas": (0.0, 0.99)},
        lambda m, n, r: ((m + n) * r + m + n + 1) * FLOAT,
    ),
    (
        "scaled-kfac-diagonal-k1-momentum",
        "scaled_lorsum",
        {"num_iters": 1},
        lambda m, n, r: (2 * (m + n) * r + m + n + 1) * FLOAT,
    ),
    (
        "scaled-shampoo-diagonal-k1",
        "scaled_lorsum",
        {"num_iters": 1, "metric": "shampoo", "betas": (0.0, 0.99)},
        lambda m, n, r: (m * n + 1) * FLOAT,
    ),
    ("svdlora", "svdlora", {}, lambda m, n, r: m * n * FLOAT),
    (
        "lorsum-k1-clip",
        "lorsum",
        {"num_iters": 1, "max_grad_norm": 1.0},
        lambda m, n, r: m * n * FLOAT,
    ),
]
DDP_ADAMW = lambda m, n, r: (m + n) * r * FLOAT  # noqa: E731  (A.grad and B.grad)


def _layer(m: int, n: int, r: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, m, bias=False))
    lorsum.add_lora(model, ["0"], rank=r)
    return model


def _measure(method: str, hparams: dict[str, Any], shape: tuple[int, int, int], rank: int):
    m, n, r = shape
    model = _layer(m, n, r)
    counted = {"ddp": 0}
    if method == "adamw":
        optimizer = lorsum.create_optimizer(model, "adamw", lr=1e-3)
    else:
        optimizer = lorsum.create_optimizer(model, method, lr=1e-3, **hparams)
    ddp = None
    if any(p.requires_grad for p in model.parameters()):
        ddp = nn.parallel.DistributedDataParallel(model)

        def count(state, bucket):  # unannotated: DDP checks the annotations' types
            counted["ddp"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return (
                dist.all_reduce(bucket.buffer().div_(WORLD), async_op=True)
                .get_future()
                .then(lambda fut: fut.value()[0])
            )

        ddp.register_comm_hook(None, count)
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x, y = torch.randn(ROWS, n, generator=g), torch.randn(ROWS, m, generator=g)
        ((ddp or model)(x) - y).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    reducer = getattr(optimizer, "reducer", None)
    if getattr(optimizer, "capture", None) is not None:
        optimizer.capture.remove()
    return {
        "optimizer_bytes_per_step": (reducer.bytes_reduced if reducer else 0) / STEPS,
        "optimizer_collectives_per_step": (reducer.calls if reducer else 0) / STEPS,
        "ddp_bytes_per_step": counted["ddp"] / STEPS,
    }


def _worker(rank: int, init_file: str, out_file: str, shapes: list[tuple[int, int, int]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = []
        for shape in shapes:
            m, n, r = shape
            rows.append(
                {
                    "method": "ddp-adamw-lora",
                    "m": m, "n": n, "r": r,
                    "formula_bytes_per_step": DDP_ADAMW(m, n, r),
                    **_measure("adamw", {}, shape, rank),
                }
            )  # fmt: skip
            for name, method, hparams, formula in METHODS:
                for factor_grads in (False, True):
                    measured = _measure(
                        method, {**hparams, "factor_grads": factor_grads}, shape, rank
                    )
                    rows.append(
                        {
                            "method": name,
                            "factor_grads": factor_grads,
                            "m": m, "n": n, "r": r,
                            "formula_bytes_per_step": formula(m, n, r),
                            **measured,
                        }
                    )  # fmt: skip
        if rank == 0:
            torch.save(rows, out_file)
        # Teardown: drop the DDP wrappers and optimizers (reference cycles hold them, and so the
        # group's gloo threads) while the group still exists, and let neither rank leave while
        # the other is inside its last collective; either can make gloo abort a rank at exit
        # ("terminate called without an active exception", seen in CI).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(shapes: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.pt")
        mp.start_processes(
            _worker,
            args=(os.path.join(tmp, "init"), out_file, shapes),
            nprocs=WORLD,
            start_method="spawn",
        )
        return torch.load(out_file, weights_only=True)


def _key(row: dict[str, Any]) -> str:
    shape = f"{row['m']}x{row['n']}r{row['r']}"
    return f"{row['method']}|factor_grads={row.get('factor_grads')}|{shape}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result directory")
    parser.add_argument("--quick", action="store_true", help="one small shape (for tests)")
    args = parser.parse_args(argv)
    shapes = [(48, 32, 4)] if args.quick else [(256, 128, 8), (1024, 1024, 16)]
    config = {"world_size": WORLD, "steps": STEPS, "rows_per_rank": ROWS, "shapes": shapes}
    start = time.perf_counter()
    rows = run(shapes)
    record = _results.make_record(
        suite="comm_volume",
        part="gloo-cpu",
        config=config,
        device="cpu",
        dtype="float32",
        seeds=[0],
        wall_time_s=time.perf_counter() - start,
        results=rows,
        summary={
            _key(row): {
                "optimizer_bytes": row["optimizer_bytes_per_step"],
                "ddp_bytes": row["ddp_bytes_per_step"],
                "formula_bytes": row["formula_bytes_per_step"],
            }
            for row in rows
        },
        notes={"bytes": "payload bytes one rank sends into all-reduce per step for the layer"},
    )
    _results.write_json_atomic(args.out / "gloo-cpu.json", record)
    for row in rows:
        print(
            f"{_key(row):60s} "
            f"optimizer {row['optimizer_bytes_per_step']:>10.0f} B (formula "
            f"{row['formula_bytes_per_step']:>10.0f}), DDP {row['ddp_bytes_per_step']:>8.0f} B"
        )


if __name__ == "__main__":
    main()
