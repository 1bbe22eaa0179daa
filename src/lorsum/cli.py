"""The ``lorsum`` command line.

``lorsum compare`` runs the built-in comparison: the deterministic synthetic low-rank task of the
LoRSum paper (spec §6.1), one full-batch step after another, with LoRSum at several sweep counts
against the exact SVD projection of the full step (SVDLoRA). The full benchmark harness with every
method and the real-data tasks replaces this default in issue #4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lorsum._version import __version__
from lorsum.functional import balanced_factors, best_rank_r, lorsum, truncated_svd

__all__ = ["main"]

_SHAPE = (600, 200)  # (m, n) of the paper's synthetic task
_RANK = 8


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorsum`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ValueError as error:  # user errors: one clear line, no traceback
        print(f"lorsum {args.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorsum", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lorsum {__version__}")
    commands = parser.add_subparsers(dest="command")
    compare = commands.add_parser(
        "compare",
        help="LoRSum sweeps against the exact SVD projection on the synthetic low-rank task",
        description=(
            "Train a rank-8 factorisation of a 600x200 Gaussian target W* from the balanced "
            "rank-8 truncation of a random init (squared loss, full batch, so the gradient is "
            "2(W - W*)), with LoRSum at each sweep count and with SVDLoRA (the exact truncated "
            "SVD of W - lr*G). Prints loss - f* (f* = the rank-8 Eckart-Young optimum) after "
            "chosen steps, averaged over seeds, and the time per step."
        ),
    )
    compare.add_argument("--steps", type=_positive_int, default=20, help="steps (default: 20)")
    compare.add_argument(
        "--lr",
        type=_positive_float,
        default=0.25,
        help="learning rate (default: 0.25; 0.5 is the exact Newton step of this quadratic)",
    )
    compare.add_argument(
        "--sweeps",
        type=_sweep_list,
        default=[0, 1, 2, 4, 8],
        help="comma-separated LoRSum sweep counts; 0 is the Jacobi pass (default: 0,1,2,4,8)",
    )
    compare.add_argument(
        "--damping",
        type=_non_negative_float,
        default=0.0,
        help="LoRSum damping lambda (default: 0)",
    )
    compare.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..S-1 (default: 3)")
    compare.add_argument("--output", type=Path, help="also write the curves as JSON to this file")
    compare.set_defaults(run=_compare)
    return parser


def _compare(args: argparse.Namespace) -> int:
    methods = [f"LoRSum x{k}" for k in args.sweeps] + ["SVDLoRA"]
    curves: dict[str, list[list[float]]] = {name: [] for name in methods}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for name in methods:  # untimed warm-up: the first call of each kernel pays torch's set-up
        _SyntheticTask(0).train(args.lr, 1, _sweeps_of(name), args.damping)
    for seed in range(args.seeds):
        task = _SyntheticTask(seed)
        for name in methods:
            curve, elapsed = task.train(args.lr, args.steps, _sweeps_of(name), args.damping)
            curves[name].append(curve)
            seconds[name].append(elapsed / args.steps)
    marks = sorted({1, min(5, args.steps), args.steps})
    print(
        f"synthetic task {_SHAPE[0]}x{_SHAPE[1]}, rank {_RANK}, lr {args.lr}, damping "
        f"{args.damping}, {args.seeds} seed(s): mean loss - f* (f* = rank-{_RANK} optimum)"
    )
    header = (
        f"{'method':<12}" + "".join(f"{'step ' + str(s):>13}" for s in marks) + f"{'ms/step':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in methods:
        means = [statistics.fmean(c[s - 1] for c in curves[name]) for s in marks]
        row = "".join(f"{value:>13.3e}" for value in means)
        print(f"{name:<12}{row}{1e3 * statistics.fmean(seconds[name]):>10.2f}")
    if args.output is not None:
        payload = {
            "task": "synthetic-deterministic",
            "config": {k: v for k, v in vars(args).items() if k not in ("run", "output")},
            "lorsum_version": __version__,
            "torch_version": torch.__version__,
            "excess_loss": curves,
            "seconds_per_step": seconds,
        }
        _write_json_atomically(args.output, payload)
        print(f"wrote {args.output}")
    return 0


def _sweeps_of(method: str) -> int | None:
    return None if method == "SVDLoRA" else int(method.split("x")[1])


class _SyntheticTask:
    """The paper's deterministic linear task (spec §6.1): fit rank-8 ``W = BA`` to ``W*``.

    Inputs are the 200 basis vectors, so ``loss = ‖W − W*‖²`` (sum reduction), the full-batch
    gradient is ``G = SᵀX`` with ``X = I`` and ``S = 2(W − W*)ᵀ``, and ``f*`` is the rank-8
    Eckart–Young residual ``Σ_{i>8} σ_i(W*)²``.
    """

    def __init__(self, seed: int) -> None:
        m, n = _SHAPE
        g = torch.Generator().manual_seed(seed)
        self.target = torch.randn(m, n, generator=g, dtype=torch.float64)
        sv = torch.linalg.svdvals(self.target)
        self.optimum = float(sv[_RANK:].square().sum())
        bound = 1.0 / n**0.5  # nn.Linear's default (Kaiming-uniform, a = √5) init range
        init = (torch.rand(m, n, generator=g, dtype=torch.float64) * 2 - 1) * bound
        self.init = balanced_factors(*truncated_svd(init, _RANK))
        self.inputs = torch.eye(n, dtype=torch.float64)

    def excess_loss(self, W: Tensor) -> float:
        return float((W - self.target).square().sum()) - self.optimum

    def train(
        self, lr: float, steps: int, sweeps: int | None, damping: float
    ) -> tuple[list[float], float]:
        """``steps`` full-batch steps; ``sweeps=None`` is SVDLoRA. Returns the curve and seconds."""
        B, A = self.init
        curve: list[float] = []
        start = time.perf_counter()
        for _ in range(steps):
            output_grads = 2.0 * (B @ A - self.target).T  # S (N = n, m): the backward pass
            if sweeps is None:
                W = best_rank_r(B @ A - lr * (output_grads.T @ self.inputs), _RANK)
                B, A = balanced_factors(*truncated_svd(W, _RANK))
            else:
                terms = [(B, A), (output_grads.T, self.inputs)]
                B, A = lorsum(terms, [1.0, -lr], (B, A), num_iters=sweeps, damping=damping)
            curve.append(self.excess_loss(B @ A))
        return curve, time.perf_counter() - start


def _write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _sweep_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


if __name__ == "__main__":
    raise SystemExit(main())
