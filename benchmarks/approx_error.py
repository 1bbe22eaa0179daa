"""How close do LoRSum sweeps come to the truncated SVD of the full step, and at what cost?

The LoRA step fits ``B A ≈ T = B0 A0 − lr·SᵀX`` (``X (N, n)`` layer inputs, ``S (N, m)``
output-gradients) at rank ``r``. The exact answer is the Eckart–Young projection ``Π_r(T)``; LoRSum
approaches it by alternating least squares without ever forming ``T``. Two parts:

* **quality** (float64, m = n = 512, r = 16, N = 1024, seeds 0–2): after k = 0 (the Jacobi pass),
  1, 2, 4, 8, 16 sweeps, with damping 0 and 1e-3, on a "random" spectrum (i.i.d. Gaussian inputs)
  and a "decaying" one (columns of X and S scaled by j^-1, then randomly rotated). Metrics: the
  relative excess residual ``‖BA − T‖_F / ‖T − Π_r(T)‖_F − 1`` (0 at the optimum) and the
  relative distance to the projection ``‖BA − Π_r(T)‖_F / ‖Π_r(T)‖_F``. The step size makes
  ``‖lr·SᵀX‖_F = ‖B0A0‖_F``.
* **cost** (float32, m = n ∈ {1024, 2048, 4096}, r = 16, N = 2048): wall time (median of
  repeats, after one warm-up) and peak resident memory of one LoRSum sweep against the dense SVD
  projection ``best_rank_r(B0 A0 − lr·SᵀX, r)``, forming the dense step included. Memory is the
  peak RSS above the inputs, measured in a fresh subprocess per (method, size).

Run from the repository root::

    python -m benchmarks.approx_error [--quick] [--force] [--out DIR]

Results go to ``benchmarks/results/approx_error/{quality,cost}.json``; a part whose file already
holds the same config hash is skipped unless ``--force``. ``--quick`` runs tiny sizes (for the test
suite) and writes to ``--out`` or a fresh temp dir, never to the committed results. The markdown
summary tables are printed to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks import _results
from lorsum.functional import best_rank_r, lorsum, lorsum_iterates

SUITE = "approx_error"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / SUITE
SPEEDUP_TARGET = 100.0  # the target at the largest size: one sweep ≥ 100× faster …
MEMORY_RATIO_TARGET = 1 / 20  # … and ≤ 1/20 of the dense projection's peak memory
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class QualityConfig:
    m: int
    n: int
    r: int
    N: int
    seeds: tuple[int, ...]
    sweeps: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
    dampings: tuple[float, ...] = (0.0, 1e-3)
    spectra: tuple[str, ...] = ("random", "decaying")
    decay_exponent: float = 1.0
    lr_rule: str = "lr = ||B0 A0||_F / ||S^T X||_F"
    dtype: str = "float64"
    quick: bool = False


@dataclass(frozen=True)
class CostConfig:
    sizes: tuple[int, ...]  # m = n
    r: int
    N: int
    lorsum_repeats: int
    dense_repeats: tuple[int, ...]  # one count per size
    warmup: int = 1
    num_iters: int = 1
    damping: float = 0.0
    seed: int = 0
    memory_warmup_size: int = 64
    lr_rule: str = "lr = sqrt(r / N)"
    dtype: str = "float32"
    quick: bool = False


def quality_config(quick: bool) -> QualityConfig:
    if quick:
        # The full config scaled down 4× in m, n, N and r: keeping r/m fixed keeps the spectral
        # gap σ_{r+1}/σ_r of T (~0.5 on the random spectrum) and so the convergence speed.
        return QualityConfig(m=128, n=128, r=4, N=256, seeds=(0,), quick=True)
    return QualityConfig(m=512, n=512, r=16, N=1024, seeds=(0, 1, 2))


def cost_config(quick: bool) -> CostConfig:
    if quick:
        return CostConfig(
            sizes=(256, 512), r=16, N=256, lorsum_repeats=3, dense_repeats=(2, 2), quick=True
        )
    # A 4096² full SVD takes ~10 s on two cores, hence only two repeats there.
    return CostConfig(
        sizes=(1024, 2048, 4096), r=16, N=2048, lorsum_repeats=10, dense_repeats=(3, 3, 2)
    )


# ---------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Step:
    """One LoRA step: weight ``B0 A0``, inputs ``X (N, n)``, output-gradients ``S (N, m)``."""

    B0: Tensor  # (m, r)
    A0: Tensor  # (r, n)
    X: Tensor  # (N, n)
    S: Tensor  # (N, m)
    lr: float

    def _args(self) -> tuple[list[tuple[Tensor, Tensor]], list[float], tuple[Tensor, Tensor]]:
        # The gradient SᵀX enters as the pair (Sᵀ, X) so that T is never formed.
        return [(self.B0, self.A0), (self.S.T, self.X)], [1.0, -self.lr], (self.B0, self.A0)

    def fit(self, num_iters: int, damping: float) -> tuple[Tensor, Tensor]:
        return lorsum(*self._args(), num_iters=num_iters, damping=damping)

    def iterates(self, num_iters: int, damping: float) -> Iterator[tuple[Tensor, Tensor]]:
        return lorsum_iterates(*self._args(), num_iters=num_iters, damping=damping)

    def dense(self) -> Tensor:
        """``T = B0 A0 − lr·SᵀX`` as an ``(m, n)`` matrix, as the dense baseline forms it."""
        return self.B0 @ self.A0 - self.lr * (self.S.T @ self.X)


def draw_step(
    spectrum: str,
    m: int,
    n: int,
    r: int,
    N: int,
    *,
    seed: int,
    dtype: torch.dtype,
    decay_exponent: float = 1.0,
    lr: float | None = None,
) -> Step:
    """A random LoRA step; ``lr=None`` picks the step size that makes ``‖lr·SᵀX‖_F = ‖B0A0‖_F``.

    Each call uses its own generator, so results never depend on the global RNG, and both
    spectra of one seed share their Gaussian draws (a paired comparison).
    """
    gen = torch.Generator().manual_seed(seed)
    B0, A0 = _gaussian(gen, dtype, m, r), _gaussian(gen, dtype, r, n)
    X, S = _gaussian(gen, dtype, N, n), _gaussian(gen, dtype, N, m)
    if spectrum == "decaying":
        X = _decaying_columns(X, gen, decay_exponent)
        S = _decaying_columns(S, gen, decay_exponent)
    elif spectrum != "random":
        raise ValueError(f"unknown spectrum {spectrum!r}; expected 'random' or 'decaying'")
    if lr is None:
        lr = float(torch.linalg.matrix_norm(B0 @ A0) / torch.linalg.matrix_norm(S.T @ X))
    return Step(B0=B0, A0=A0, X=X, S=S, lr=lr)


def expected_lr(r: int, N: int) -> float:
    """The step-size rule in expectation for i.i.d. standard Gaussian factors.

    ``E‖B0A0‖_F² = m n r`` and ``E‖SᵀX‖_F² = m n N``. The cost part uses this instead of the exact
    ratio because computing ``‖SᵀX‖_F`` would form the m×n gradient before the memory measurement.
    """
    return math.sqrt(r / N)


def _gaussian(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _decaying_columns(Z: Tensor, gen: torch.Generator, exponent: float) -> Tensor:
    """``Z diag(j^-p) Q``: column j scaled by ``j^-p``, then a Haar-random rotation of the columns.

    The rotation keeps the dominant directions of ``SᵀX`` off the coordinate axes.
    """
    cols = Z.shape[1]
    scale = torch.arange(1, cols + 1, dtype=Z.dtype).pow(-exponent)
    return (Z * scale) @ _haar_orthogonal(cols, gen, Z.dtype)


def _haar_orthogonal(size: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    Q, R = torch.linalg.qr(_gaussian(gen, dtype, size, size))
    # Without fixing the signs of diag(R), QR's sign convention biases Q away from Haar measure.
    return Q * torch.sign(torch.diagonal(R))


# ---------------------------------------------------------------------------------------------
# Part 1: quality


@dataclass(frozen=True)
class Oracle:
    """The full step ``T`` and its Eckart–Young projection ``Π_r(T)``, against which fits score."""

    T: Tensor
    proj: Tensor
    tail_norm: float  # ‖T − Π_r(T)‖_F, the least residual any rank-r fit can reach
    proj_norm: float
    sigma: Tensor  # all singular values of T, descending

    @staticmethod
    def of(T: Tensor, r: int) -> Oracle:
        proj = best_rank_r(T, r)
        return Oracle(
            T=T,
            proj=proj,
            tail_norm=float(torch.linalg.matrix_norm(T - proj)),
            proj_norm=float(torch.linalg.matrix_norm(proj)),
            sigma=torch.linalg.svdvals(T),
        )

    def errors(self, B: Tensor, A: Tensor) -> tuple[float, float]:
        """``(excess residual, relative distance to Π_r(T))`` of the fit ``B A``."""
        BA = B @ A
        excess = float(torch.linalg.matrix_norm(BA - self.T)) / self.tail_norm - 1.0
        distance = float(torch.linalg.matrix_norm(BA - self.proj)) / self.proj_norm
        return excess, distance


def fits_by_sweep(
    step: Step, damping: float, sweeps: Sequence[int]
) -> dict[int, tuple[Tensor, Tensor]]:
    """``(B, A)`` after each number of sweeps in ``sweeps``; 0 is the Jacobi pass.

    One ``lorsum_iterates`` run serves every k ≥ 1: it yields after each half-step, and the
    (2k)-th pair closes sweep k, so the earlier sweeps are never recomputed.
    """
    fits = {0: step.fit(0, damping)} if 0 in sweeps else {}
    wanted = {k for k in sweeps if k > 0}
    if wanted:
        for half_steps, pair in enumerate(step.iterates(max(wanted), damping), start=1):
            if half_steps % 2 == 0 and half_steps // 2 in wanted:
                fits[half_steps // 2] = pair
    return fits


def run_quality(cfg: QualityConfig) -> dict[str, Any]:
    start = time.perf_counter()
    dtype = getattr(torch, cfg.dtype)
    scores: dict[tuple[str, float, int], list[tuple[float, float]]] = {}
    problems = []
    for spectrum in cfg.spectra:
        for seed in cfg.seeds:
            _log(f"quality: {spectrum} spectrum, seed {seed}")
            step = draw_step(
                spectrum,
                cfg.m,
                cfg.n,
                cfg.r,
                cfg.N,
                seed=seed,
                dtype=dtype,
                decay_exponent=cfg.decay_exponent,
            )
            oracle = Oracle.of(step.dense(), cfg.r)
            problems.append(_problem_info(spectrum, seed, step, oracle, cfg.r))
            for damping in cfg.dampings:
                for k, (B, A) in fits_by_sweep(step, damping, cfg.sweeps).items():
                    scores.setdefault((spectrum, damping, k), []).append(oracle.errors(B, A))
    results = [
        _quality_entry(spectrum, damping, k, cfg.seeds, scores[spectrum, damping, k])
        for spectrum in cfg.spectra
        for damping in cfg.dampings
        for k in cfg.sweeps
    ]
    return _results.make_record(
        suite=SUITE,
        part="quality",
        config=asdict(cfg),
        device="cpu",
        dtype=cfg.dtype,
        seeds=cfg.seeds,
        wall_time_s=time.perf_counter() - start,
        results=results,
        summary={"problems": problems, **_quality_summary(results)},
        notes={
            "k": "number of alternating sweeps; k = 0 is the Jacobi pass (lorsum num_iters=0)",
            "excess_residual": "||BA - T||_F / ||T - Pi_r(T)||_F - 1, 0 at the optimum",
            "rel_dist_to_projection": "||BA - Pi_r(T)||_F / ||Pi_r(T)||_F",
            "gap": "sigma_{r+1} / sigma_r of T; undamped sweeps converge like gap^(2k)",
            "decaying": "X = Z_X diag(j^-p) Q_X, S = Z_S diag(j^-p) Q_S, Q Haar-orthogonal",
        },
    )


def _problem_info(spectrum: str, seed: int, step: Step, oracle: Oracle, r: int) -> dict[str, Any]:
    sigma = oracle.sigma
    return {
        "spectrum": spectrum,
        "seed": seed,
        "lr": step.lr,
        "weight_norm": float(torch.linalg.matrix_norm(step.B0 @ step.A0)),
        "step_norm": step.lr * float(torch.linalg.matrix_norm(step.S.T @ step.X)),
        "sigma_r": float(sigma[r - 1]),
        "sigma_r_plus_1": float(sigma[r]),
        "gap": float(sigma[r] / sigma[r - 1]),
        "tail_over_T": oracle.tail_norm / float(torch.linalg.matrix_norm(oracle.T)),
    }


def _quality_entry(
    spectrum: str, damping: float, k: int, seeds: Sequence[int], scores: list[tuple[float, float]]
) -> dict[str, Any]:
    excess, distance = ([s[i] for s in scores] for i in (0, 1))
    return {
        "spectrum": spectrum,
        "damping": damping,
        "k": k,
        "seeds": list(seeds),
        "excess_residual": {"per_seed": excess, "mean": statistics.fmean(excess)},
        "rel_dist_to_projection": {"per_seed": distance, "mean": statistics.fmean(distance)},
    }


def _quality_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Means keyed ``[metric][spectrum][damping][k]`` (strings, as JSON keys must be)."""
    summary: dict[str, Any] = {}
    for metric in ("excess_residual", "rel_dist_to_projection"):
        table = summary.setdefault(f"mean_{metric}", {})
        for e in results:
            by_k = table.setdefault(e["spectrum"], {}).setdefault(str(e["damping"]), {})
            by_k[str(e["k"])] = e[metric]["mean"]
    return summary


# ---------------------------------------------------------------------------------------------
# Part 2: cost


def _lorsum_sweeps(step: Step, cfg: CostConfig) -> object:
    return step.fit(cfg.num_iters, cfg.damping)


def _dense_projection(step: Step, cfg: CostConfig) -> object:
    return best_rank_r(step.dense(), cfg.r)


COST_METHODS: dict[str, Callable[[Step, CostConfig], object]] = {
    "lorsum": _lorsum_sweeps,
    "dense_svd_projection": _dense_projection,
}


def cost_step(size: int, cfg: CostConfig) -> Step:
    dtype = getattr(torch, cfg.dtype)
    lr = expected_lr(cfg.r, cfg.N)
    return draw_step("random", size, size, cfg.r, cfg.N, seed=cfg.seed, dtype=dtype, lr=lr)


def time_calls(fn: Callable[[], object], *, repeats: int, warmup: int) -> list[float]:
    """Wall times of ``repeats`` calls after ``warmup`` untimed ones (CPU: no sync needed)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_cost(cfg: CostConfig) -> dict[str, Any]:
    start = time.perf_counter()
    # Other processes on the same cores distort the timings badly (OpenMP threads spin-wait), so
    # keep the load that was there before this part started next to the numbers.
    load_before = list(os.getloadavg())
    results = [
        _cost_at_size(size, dense_repeats, cfg)
        for size, dense_repeats in zip(cfg.sizes, cfg.dense_repeats, strict=True)
    ]
    largest = results[-1]
    target = {
        "size": largest["size"],
        "speedup": largest["speedup"],
        "speedup_target": SPEEDUP_TARGET,
        "speedup_met": largest["speedup"] >= SPEEDUP_TARGET,
        "memory_ratio": largest["memory_ratio"],
        "memory_ratio_target": MEMORY_RATIO_TARGET,
        "memory_met": largest["memory_ratio"] <= MEMORY_RATIO_TARGET,
    }
    return _results.make_record(
        suite=SUITE,
        part="cost",
        config=asdict(cfg),
        device="cpu",
        dtype=cfg.dtype,
        seeds=(cfg.seed,),
        wall_time_s=time.perf_counter() - start,
        results=results,
        summary={"target_at_largest_size": target, "load_average_1_5_15_before": load_before},
        notes={
            "lorsum": f"lorsum(num_iters={cfg.num_iters}, damping={cfg.damping}) on the pairs "
            "(B0, A0), (S^T, X)",
            "dense_svd_projection": "best_rank_r(B0 @ A0 - lr * (S.T @ X), r): forms the step, "
            "then a full torch.linalg.svd",
            "time": "median/min/max of perf_counter wall times after one warm-up call",
            "peak_extra_bytes": "peak resident memory above the inputs, fresh process: "
            "VmHWM after the op minus RSS (/proc/self/statm) just before it; the high-water "
            "mark is reset (/proc/self/clear_refs) before the op and the op is first warmed up "
            f"on a {cfg.memory_warmup_size}x{cfg.memory_warmup_size} problem so one-time library "
            "initialisation is not counted; the first full-size call still allocates BLAS / "
            "OpenMP buffers that stay resident (a repeated call needs less)",
            "peak_rss_source": "VmHWM, not ru_maxrss: a child's ru_maxrss includes the peak "
            "RSS of the process that exec'ed it, i.e. of this benchmark's parent process",
            "speedup": "dense median time / lorsum median time",
            "memory_ratio": "lorsum peak_extra_bytes / dense peak_extra_bytes",
            "dense_step_bytes": "m * n * element size: the analytic size of the dense step",
            "lr": "sqrt(r / N), the rule ||lr S^T X||_F = ||B0 A0||_F in expectation",
        },
    )


def _cost_at_size(size: int, dense_repeats: int, cfg: CostConfig) -> dict[str, Any]:
    _log(f"cost: m = n = {size}, timing")
    step = cost_step(size, cfg)
    repeats = {"lorsum": cfg.lorsum_repeats, "dense_svd_projection": dense_repeats}
    times = {
        method: _results.time_stats(
            time_calls(
                partial(COST_METHODS[method], step, cfg),
                repeats=repeats[method],
                warmup=cfg.warmup,
            )
        )
        for method in COST_METHODS
    }
    del step
    gc.collect()
    _log(f"cost: m = n = {size}, peak memory (fresh subprocesses)")
    memory = {method: _memory_in_subprocess(method, size, cfg) for method in COST_METHODS}
    lorsum_mem = memory["lorsum"]["peak_extra_bytes"]
    dense_mem = memory["dense_svd_projection"]["peak_extra_bytes"]
    return {
        "size": size,
        "m": size,
        "n": size,
        "time": times,
        "memory": memory,
        "dense_step_bytes": size * size * getattr(torch, cfg.dtype).itemsize,
        "speedup": times["dense_svd_projection"]["median_s"] / times["lorsum"]["median_s"],
        "memory_ratio": lorsum_mem / dense_mem if dense_mem > 0 else math.nan,
    }


def _memory_in_subprocess(method: str, size: int, cfg: CostConfig) -> dict[str, Any]:
    """Run :func:`measure_memory` in a fresh interpreter, whose peak RSS only this op has raised."""
    spec = {
        "method": method,
        "size": size,
        "config": asdict(cfg),
        "threads": torch.get_num_threads(),
    }
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.approx_error", "--_measure-memory", json.dumps(spec)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {method} at {size} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(method: str, size: int, cfg: CostConfig) -> dict[str, Any]:
    """Peak resident memory of one call of ``method`` above its inputs, in this process."""
    op = COST_METHODS[method]
    # A tiny warm-up first: lazy library initialisation and first-call buffers (MKL, LAPACK) are
    # a one-time cost of the process, not memory that the op needs per call.
    tiny = cfg.memory_warmup_size
    op(cost_step(tiny, replace(cfg, N=tiny)), cfg)
    step = cost_step(size, cfg)
    gc.collect()
    hwm_reset = _results.reset_peak_rss()
    rss_before = _results.current_rss_bytes()
    hwm_before = _results.peak_rss_bytes()
    result = op(step, cfg)
    hwm_after = _results.peak_rss_bytes()
    del result
    return {
        "peak_extra_bytes": hwm_after - rss_before,
        "rss_before_op_bytes": rss_before,
        "hwm_before_op_bytes": hwm_before,
        "hwm_after_op_bytes": hwm_after,
        # False: the op stayed below an older high-water mark, and peak_extra_bytes is only an
        # upper bound of its memory.
        "op_raised_peak": hwm_after > hwm_before,
        "hwm_reset": hwm_reset,
    }


# ---------------------------------------------------------------------------------------------
# Tables


def quality_tables(record: dict[str, Any]) -> str:
    cfg = record["config"]
    columns = [(s, d) for s in cfg["spectra"] for d in cfg["dampings"]]
    headers = ["k", *(f"{s}, λ={d:g}" for s, d in columns)]
    parts = []
    for metric, title in (
        ("excess_residual", "mean ‖BA − T‖ / ‖T − Π_r(T)‖ − 1"),
        ("rel_dist_to_projection", "mean ‖BA − Π_r(T)‖ / ‖Π_r(T)‖"),
    ):
        means = record["summary"][f"mean_{metric}"]
        rows = [
            [_k_label(k), *(f"{means[s][str(d)][str(k)]:.2e}" for s, d in columns)]
            for k in cfg["sweeps"]
        ]
        shape = f"m = n = {cfg['m']}, r = {cfg['r']}, N = {cfg['N']}, {cfg['dtype']}"
        caption = f"**{title}** ({shape}, {len(cfg['seeds'])} seeds)"
        parts.append(f"{caption}\n\n{_results.markdown_table(headers, rows)}")
    problems = record["summary"]["problems"]
    gaps = {
        s: statistics.fmean(p["gap"] for p in problems if p["spectrum"] == s)
        for s in cfg["spectra"]
    }
    parts.append("mean σ_{r+1}/σ_r of T: " + ", ".join(f"{s} {g:.3f}" for s, g in gaps.items()))
    return "\n\n".join(parts)


def cost_table(record: dict[str, Any]) -> str:
    cfg = record["config"]
    headers = [
        "m = n",
        f"lorsum {cfg['num_iters']} sweep (ms)",
        "dense SVD proj. (s)",
        "speedup",
        "lorsum peak (MiB)",
        "dense peak (MiB)",
        "memory ratio",
        "dense step (MiB)",
    ]
    rows = []
    for e in record["results"]:
        ratio = e["memory_ratio"]
        rows.append(
            [
                str(e["size"]),
                f"{e['time']['lorsum']['median_s'] * 1e3:.2f}",
                f"{e['time']['dense_svd_projection']['median_s']:.3f}",
                f"{e['speedup']:.0f}×",
                f"{e['memory']['lorsum']['peak_extra_bytes'] / MIB:.2f}",
                f"{e['memory']['dense_svd_projection']['peak_extra_bytes'] / MIB:.1f}",
                f"{ratio:.4f} (1/{1 / ratio:.0f})" if ratio > 0 else f"{ratio:.4f}",
                f"{e['dense_step_bytes'] / MIB:.0f}",
            ]
        )
    target = record["summary"]["target_at_largest_size"]
    verdict = (
        f"target at {target['size']}: speedup ≥ {target['speedup_target']:.0f}× "
        f"{'met' if target['speedup_met'] else 'NOT met'}, memory ≤ 1/"
        f"{1 / target['memory_ratio_target']:.0f} {'met' if target['memory_met'] else 'NOT met'}"
    )
    title = (
        f"**cost** (r = {cfg['r']}, N = {cfg['N']}, {cfg['dtype']}, "
        f"{record['environment']['torch_num_threads']} threads, median times)"
    )
    return f"{title}\n\n{_results.markdown_table(headers, rows)}\n\n{verdict}"


def _k_label(k: int) -> str:
    return "0 (Jacobi)" if k == 0 else str(k)


# ---------------------------------------------------------------------------------------------
# Command line


def _log(message: str) -> None:
    print(f"[{SUITE}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.approx_error", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed (for tests)")
    parser.add_argument("--force", action="store_true", help="re-run parts whose results exist")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"result directory (default: {DEFAULT_OUT})"
    )
    # Internal: the fresh-process memory measurement of one (method, size), spec as JSON.
    parser.add_argument("--_measure-memory", dest="measure_memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.out is not None and args.out.resolve() == DEFAULT_OUT:
        parser.error("--quick results must not overwrite the committed results; pick another --out")
    return args


def _output_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if args.quick:
        return Path(tempfile.mkdtemp(prefix=f"lorsum-{SUITE}-quick-"))
    return DEFAULT_OUT


def _run_part(
    name: str,
    config: QualityConfig | CostConfig,
    run: Callable[[Any], dict[str, Any]],
    out: Path,
    force: bool,
) -> dict[str, Any]:
    path = out / f"{name}.json"
    current = None if force else _results.load_current(path, asdict(config))
    if current is not None:
        _log(f"{name}: {path} has the same config hash, skipped (--force re-runs it)")
        return current
    record = run(config)
    _results.write_json_atomic(path, record)
    _log(f"{name}: wrote {path} ({record['wall_time_s']:.1f} s)")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure_memory is not None:
        spec = json.loads(args.measure_memory)
        torch.set_num_threads(spec["threads"])
        # JSON turned the config's tuples into lists; the dataclass wants them back.
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()}
        print(json.dumps(measure_memory(spec["method"], spec["size"], CostConfig(**fields))))
        return 0
    out = _output_dir(args)
    quality = _run_part("quality", quality_config(args.quick), run_quality, out, args.force)
    cost = _run_part("cost", cost_config(args.quick), run_cost, out, args.force)
    print(quality_tables(quality), cost_table(cost), sep="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
