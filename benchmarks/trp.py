"""TRP on the image task: test accuracy against the rank kept, next to post-hoc truncation.

Measured (issue 5), with one optimizer, budget and set of seeds for every arm:

- **baseline**: ordinary training of all weights, evaluated as is;
- **post-hoc**: the baseline model with its target layers split by truncated SVD, without
  fine-tuning, at a grid of energies and at exactly the ranks each TRP run ended with
  (``post-hoc@trp-<solver>``, the same parameter count);
- **trp-svd** / **trp-lorsum**: :class:`~lorsum.compression.TrainedRankPruning` at several
  energies, its truncations computed by a full SVD or warm-started by LoRSum sweeps; at the end
  the wrapper splits every target into two thin layers and the split model is evaluated.

For each: test accuracy, the final per-layer ranks, the parameters of the target layers before
and after the split, the rank and parameter reduction, the training wall time and the part of it
spent in TRP's projections. Mean ± sample standard deviation over seeds, and TRP's accuracy
minus that of the post-hoc split at its ranks, paired by seed (same initialisation and batches).

Stand-ins, stated plainly (the defaults; each is an option): the TRP paper trains ResNets on
CIFAR-10 and ImageNet; here LeNet-5 on CIFAR-10 re-encoded as JPEG (q75), the image task's quick
subset (1,000 training images per class, the whole test set), 2 epochs, on one CPU thread.
Targets: every convolution and linear layer except the first convolution (as in the paper) and
the output layer (rank ≤ 10 already). Optimizer: the image task's ``full-sgd`` recipe (SGD with
momentum on the linear layers at its swept rate, AdamW lr 1e-3 on the rest). TRP: the upstream
code's defaults, a projection every step and no nuclear-norm term. Run from the repository root::

    python -m benchmarks.trp [--out-dir benchmarks/results/trp] [--data-dir ../shared/data]

A stored result with the same config hash is reused (``--force`` trains again); its summary is
recomputed from the stored runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import _cli, _results, plots
from benchmarks.tasks import image
from lorsum.compression import LayerReport, TrainedRankPruning, split_layer
from lorsum.compression.trp import matrix_view

SUITE = "trp"
DEFAULT_OUT = _results.REPO_ROOT / "benchmarks" / "results" / SUITE
DEFAULT_ENERGIES = (0.8, 0.9, 0.95, 0.99)  # 0.9 is the paper's
# A finer grid for post-hoc truncation, which costs one evaluation per point; 1.0 is the check
# that splitting alone changes nothing.
DEFAULT_POST_HOC_ENERGIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
SOLVERS = ("svd", "lorsum")
DENSE_LR = 1e-3  # the image task's AdamW rate for the parameters outside the linear layers


def target_layers(model: nn.Module) -> list[str]:
    """Every ``nn.Conv2d`` / ``nn.Linear`` except the first (the input convolution, which the
    paper leaves out) and the last (the classifier, of rank at most the number of classes)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if len(layers) < 3:
        raise ValueError(f"TRP needs a model with at least 3 layers to target, got {layers}")
    return layers[1:-1]


def make_optimizers(model: nn.Module, variant: str, lr: float) -> list[torch.optim.Optimizer]:
    """The image task's ``full-sgd`` recipe: SGD with its momentum on every linear layer at
    ``lr``, AdamW at 1e-3 on the other parameters (convolutions, norms, embeddings)."""
    _, hparams = image.methods(variant)["full-sgd"]
    linear = [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()]
    in_linear = {id(p) for p in linear}
    rest = [p for p in model.parameters() if id(p) not in in_linear]
    return [torch.optim.SGD(linear, lr=lr, **hparams), torch.optim.AdamW(rest, lr=DENSE_LR)]


def train_model(
    model: nn.Module, data: Mapping[str, torch.Tensor], *, variant: str, lr: float, epochs: int,
    seed: int, trp: TrainedRankPruning | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train ``model`` in place for ``epochs`` over ``data["train_x"]`` in batches of the image
    task, in the image task's batch order for ``seed``; with ``trp``, its projection before every
    forward and its subgradient after every backward. Returns the times and the last loss."""
    optimizers = make_optimizers(model, variant, lr)
    generator = torch.Generator().manual_seed(20_000 + seed)  # as image.train draws its batches
    images, labels = data["train_x"], data["train_y"]
    losses, projection_s = [], 0.0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(images.shape[0], generator=generator).split(image.BATCH):
            if trp is not None:
                tick = time.perf_counter()
                trp.project_if_due()
                projection_s += time.perf_counter() - tick
            model.train()
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            if trp is not None:
                trp.add_nuclear_subgradient()
            for optimizer in optimizers:
                optimizer.step()
            losses.append(float(loss.detach()))
    per_epoch = len(losses) // epochs
    return {
        "steps": len(losses),
        "train_time_s": time.perf_counter() - start,
        "projection_time_s": projection_s,
        "last_epoch_train_loss": statistics.fmean(losses[-per_epoch:]),
    }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_split(reports: Sequence[LayerReport], model_before: int, model: nn.Module) -> dict:
    """Ranks, parameter counts and reductions of one split model (``model_before``: the dense
    model's parameter count), the fields every arm but the baseline records."""
    layers = [{**asdict(r), "full_rank": min(r.shape)} for r in reports]
    before = sum(r.parameters_before for r in reports)
    after = sum(r.parameters_after for r in reports)
    kept_rank = sum(r.rank for r in reports) / sum(min(r.shape) for r in reports)
    return {
        "layers": layers,
        "ranks": {r.name: r.rank for r in reports},
        "parameters": {
            "targets_before": before,
            "targets_after": after,
            "model_before": model_before,
            "model_after": count_parameters(model),
        },
        "parameters_kept": after / before,
        "parameter_reduction": 1.0 - after / before,
        "rank_reduction": 1.0 - kept_rank,
    }


def energy_of_rank(layer: nn.Linear | nn.Conv2d, rank: int) -> float:
    """The fraction of ``‖W‖²_F`` held by the ``rank`` largest singular values of the layer's
    TRP matrix view: the energy at which :func:`~lorsum.compression.split_layer` keeps exactly
    ``rank`` (its rule takes the smallest rank reaching the energy, with a rounding slack far
    above the one-ulp error of this ratio)."""
    matrix = matrix_view(layer.weight.detach())
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must be in [1, {min(matrix.shape)}], got {rank}")
    # The same float64 SVD call as split_layer's, so both see the same singular values.
    energies = torch.linalg.svd(matrix.double(), full_matrices=False).S.square().cumsum(0)
    return float(energies[rank - 1] / energies[-1])


@torch.no_grad()
def post_hoc(
    model: nn.Module, targets: Sequence[str], *, energy: float | None = None,
    ranks: Mapping[str, int] | None = None,
) -> tuple[nn.Module, list[LayerReport]]:  # fmt: skip
    """A copy of ``model`` with each target split by truncated SVD (no fine-tuning), keeping
    ``energy`` of every layer or exactly ``ranks[name]`` singular values."""
    if (energy is None) == (ranks is None):
        raise ValueError("post_hoc: give exactly one of energy and ranks")
    split = copy.deepcopy(model)
    reports = []
    for name in targets:
        layer = split.get_submodule(name)
        layer_energy = energy if ranks is None else energy_of_rank(layer, ranks[name])
        module, report = split_layer(layer, energy=layer_energy, name=name)
        if ranks is not None and report.rank != ranks[name]:
            raise RuntimeError(
                f"{name}: split at energy {layer_energy!r} kept rank {report.rank}, "
                f"not the requested {ranks[name]}"
            )
        split.set_submodule(name, module)
        reports.append(report)
    return split, reports


def finish_trp(trp: TrainedRankPruning, data: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Evaluate the trained model, split it with the wrapper's final step (at the training
    energy) and evaluate the split model."""
    model_before = count_parameters(trp.model)
    accuracy_before = image.evaluate(trp.model, data["test_x"], data["test_y"])
    last_projection = trp.ranks()
    reports = trp.finalize()
    return {
        "test_accuracy": image.evaluate(trp.model, data["test_x"], data["test_y"]),
        "test_accuracy_before_split": accuracy_before,
        "last_projection_ranks": last_projection,
        "svd_calls": trp.svd_calls,
        "warm_calls": trp.warm_calls,
        **describe_split(reports, model_before, trp.model),
    }


def run_seed(config: Mapping[str, Any], data: Mapping[str, torch.Tensor], seed: int) -> list:
    """Every arm of one seed: the baseline and its post-hoc splits, then each TRP run and the
    baseline split at that run's ranks."""
    variant, evaluate = config["variant"], image.evaluate
    common = {"variant": variant, "lr": config["lr"], "epochs": config["epochs"], "seed": seed}
    baseline = image.build_model(variant, seed=seed)
    targets = target_layers(baseline)
    timing = train_model(baseline, data, **common)
    dense = count_parameters(baseline)
    runs = [
        {"arm": "baseline", "seed": seed, "energy": None,
         "test_accuracy": evaluate(baseline, data["test_x"], data["test_y"]), **timing},
    ]  # fmt: skip
    _progress(runs[-1])
    for energy in config["post_hoc_energies"]:
        split, reports = post_hoc(baseline, targets, energy=energy)
        runs.append(
            {"arm": "post-hoc", "seed": seed, "energy": energy,
             "test_accuracy": evaluate(split, data["test_x"], data["test_y"]),
             **describe_split(reports, dense, split)}
        )  # fmt: skip
    for energy in config["energies"]:
        for solver in config["solvers"]:
            model = image.build_model(variant, seed=seed)  # the baseline's initialisation
            trp = TrainedRankPruning(
                model, targets, energy=energy, period=config["period"], solver=solver,
                nuclear_weight=config["nuclear_weight"], sweeps=config["sweeps"],
            )  # fmt: skip
            timing = train_model(model, data, trp=trp, **common)
            runs.append(
                {"arm": f"trp-{solver}", "seed": seed, "energy": energy, **timing,
                 **finish_trp(trp, data)}
            )  # fmt: skip
            _progress(runs[-1])
            split, reports = post_hoc(baseline, targets, ranks=runs[-1]["ranks"])
            runs.append(
                {"arm": f"post-hoc@trp-{solver}", "seed": seed, "energy": energy,
                 "test_accuracy": evaluate(split, data["test_x"], data["test_y"]),
                 **describe_split(reports, dense, split)}
            )  # fmt: skip
    return runs


def _progress(run: Mapping[str, Any]) -> None:
    ranks = "/".join(str(k) for k in run.get("ranks", {}).values()) or "dense"
    print(
        f"seed {run['seed']} {run['arm']:<10} energy {run['energy']}: accuracy "
        f"{run['test_accuracy']:.4f}, ranks {ranks}, {run['train_time_s']:.1f} s",
        flush=True,
    )


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (arm, energy), in the order first seen: means and sample standard
    deviations over seeds, and the per-seed accuracies and ranks."""
    groups: dict[tuple[str, float | None], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["arm"], run["energy"]), []).append(run)
    accuracy = {(r["arm"], r["energy"], r["seed"]): r["test_accuracy"] for r in runs}
    rows = []
    for (arm, energy), group in groups.items():
        row: dict[str, Any] = {
            "arm": arm,
            "energy": energy,
            "seeds": [r["seed"] for r in group],
            "test_accuracy": _mean_std([r["test_accuracy"] for r in group]),
            "test_accuracy_per_seed": [r["test_accuracy"] for r in group],
        }
        if "ranks" in group[0]:
            names = list(group[0]["ranks"])
            row["ranks_per_seed"] = [[r["ranks"][n] for n in names] for r in group]
            row["ranks_mean"] = {n: statistics.fmean(r["ranks"][n] for r in group) for n in names}
            row["full_ranks"] = {layer["name"]: layer["full_rank"] for layer in group[0]["layers"]}
            for key in ("parameters_kept", "parameter_reduction", "rank_reduction"):
                row[key] = _mean_std([r[key] for r in group])
            row["targets_parameters_after"] = _mean_std(
                [r["parameters"]["targets_after"] for r in group]
            )
            row["targets_parameters_before"] = group[0]["parameters"]["targets_before"]
        if "train_time_s" in group[0]:
            for key in ("train_time_s", "projection_time_s"):
                row[key] = _mean_std([r[key] for r in group])
        if "test_accuracy_before_split" in group[0]:
            row["test_accuracy_before_split"] = _mean_std(
                [r["test_accuracy_before_split"] for r in group]
            )
            row["svd_calls"] = [r["svd_calls"] for r in group]
            row["warm_calls"] = [r["warm_calls"] for r in group]
            # Paired by seed (same initialisation and batches): TRP minus the baseline split at
            # exactly the ranks this TRP run ended with.
            gaps = [
                r["test_accuracy"] - accuracy[(f"post-hoc@{arm}", energy, r["seed"])] for r in group
            ]
            row["minus_post_hoc_same_ranks"] = {**_mean_std(gaps), "per_seed": gaps}
        rows.append(row)
    return rows


def run(config: Mapping[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    data = image.load_data(config["variant"], config["data_dir"], size=config["size"])
    runs = [r for seed in range(config["seeds"]) for r in run_seed(config, data, seed)]
    return _results.make_record(
        suite=SUITE,
        part=config["variant"],
        config=config,
        device="cpu",
        dtype="float32",
        seeds=range(config["seeds"]),
        wall_time_s=time.perf_counter() - start,
        results=runs,
        summary=summarize(runs),
        notes={
            "stand-ins": "LeNet-5 / PatchMLP on CIFAR-10 (JPEG q75) or Fashion-MNIST, the image "
            "task's training subset, instead of the paper's ResNets on CIFAR-10 and ImageNet",
            "post-hoc": "the baseline model split by truncated SVD, no fine-tuning; "
            "post-hoc@trp-<solver> keeps exactly the ranks that TRP run ended with",
            "trp": "test_accuracy is the split model's (TrainedRankPruning.finalize at the "
            "training energy); test_accuracy_before_split the trained model's",
            "parameters": "targets_*: the target layers' weights and biases before and after "
            "the split; model_*: the whole model's",
            "rank_reduction": "1 - sum of kept ranks / sum of min(m, n) over the target layers",
            "times": "train_time_s: wall time of the training loop (no evaluation); "
            "projection_time_s: the part spent in TrainedRankPruning.project_if_due",
            "std": "sample standard deviation over seeds",
        },
    )


def format_table(summary: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for row in summary:
        ranks = "/".join(f"{k:.4g}" for k in row.get("ranks_mean", {}).values()) or "dense"
        kept = f"{row['parameters_kept']['mean']:.3f}" if "parameters_kept" in row else "1"
        times = "–"
        if "train_time_s" in row:
            times = f"{row['train_time_s']['mean']:.1f} ± {row['train_time_s']['std']:.1f}"
        projection = gap = "–"
        if row["arm"].startswith("trp"):
            projection = f"{row['projection_time_s']['mean']:.1f}"
            diff = row["minus_post_hoc_same_ranks"]
            gap = f"{diff['mean']:+.4f} ± {diff['std']:.4f}"
        accuracy = row["test_accuracy"]
        rows.append([
            row["arm"], "–" if row["energy"] is None else f"{row['energy']:g}", ranks, kept,
            f"{accuracy['mean']:.4f} ± {accuracy['std']:.4f}", gap, times, projection,
        ])  # fmt: skip
    headers = [
        "arm", "energy", "ranks (mean per layer)", "target params kept", "test accuracy",
        "minus post-hoc at same ranks", "train s", "projection s",
    ]  # fmt: skip
    return _results.markdown_table(headers, rows)


def plot(record: Mapping[str, Any], path: Path) -> None:
    """Three panels: test accuracy against the fraction of the target layers' parameters kept
    (every arm, with the dense baseline); TRP minus post-hoc truncation at the same ranks, per
    seed; and the TRP runs' training time with the part spent in projections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm: dict[str, list[Mapping[str, Any]]] = {}
    for row in record["summary"]:
        by_arm.setdefault(row["arm"], []).append(row)
    solvers = [s for s in SOLVERS if f"trp-{s}" in by_arm]
    colors = {"svd": "tab:blue", "lorsum": "tab:orange"}
    fig, (ax, ax_gap, ax_time) = plt.subplots(1, 3, figsize=(17, 5), width_ratios=(3, 2, 2))

    base = by_arm["baseline"][0]["test_accuracy"]
    ax.axhline(base["mean"], color="black", lw=1, label=f"baseline (dense) {base['mean']:.3f}")
    ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="black", alpha=0.1)
    # (arm, style, nudge): TRP and its same-rank post-hoc split share an x; the nudge (a few
    # percent on the log axis) keeps their error bars apart. post-hoc@trp-lorsum is left out:
    # its ranks are TRP-svd's within one (the table has it).
    series = [
        ("post-hoc", {"color": "tab:gray", "marker": ".", "ls": "-"}, 1.0),
        ("post-hoc@trp-svd", {"color": "tab:gray", "marker": "s", "ls": "none", "mfc": "none"},
         1.06),
        ("trp-svd", {"color": colors["svd"], "marker": "o", "ls": "none"}, 0.94),
        ("trp-lorsum", {"color": colors["lorsum"], "marker": "x", "ls": "none", "ms": 9}, 1.0),
    ]  # fmt: skip
    for arm, style, nudge in series:
        rows = by_arm.get(arm, [])
        if not rows:
            continue
        x = [nudge * r["parameters_kept"]["mean"] for r in rows]
        y = [r["test_accuracy"]["mean"] for r in rows]
        err = [r["test_accuracy"]["std"] for r in rows]
        label = "post-hoc at TRP-svd's ranks" if arm == "post-hoc@trp-svd" else arm
        ax.errorbar(x, y, yerr=err, capsize=3, lw=1.2, label=label, **style)
        for xi, yi, r in zip(x, y, rows, strict=True):
            # Energies above ~0.9 split into more parameters than the dense layers hold; their
            # points crowd together at the right, so only the others are labelled.
            if arm in ("post-hoc", "trp-svd") and r["parameters_kept"]["mean"] < 1.0:
                ax.annotate(f"{r['energy']:g}", (xi, yi), fontsize=7, xytext=(4, -10),
                            textcoords="offset points", color=style["color"])  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters of the target layers kept after the split (fraction, log)")
    ax.set_ylabel(f"test accuracy, mean ± std over {len(record['seeds'])} seeds")
    ax.set_title(f"{record['config']['variant']}: accuracy vs size (labels: energy)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")

    energies = [r["energy"] for r in by_arm[f"trp-{solvers[0]}"]] if solvers else []
    width = 0.8 / max(len(solvers), 1)
    for i, solver in enumerate(solvers):
        rows = by_arm[f"trp-{solver}"]
        offset = (i - (len(solvers) - 1) / 2) * width
        for j, r in enumerate(rows):
            gaps = r["minus_post_hoc_same_ranks"]["per_seed"]
            ax_gap.plot([j + offset] * len(gaps), gaps, ".", color=colors[solver], alpha=0.6)
        means = [r["minus_post_hoc_same_ranks"]["mean"] for r in rows]
        ax_gap.plot([j + offset for j in range(len(rows))], means, "_", ms=18, mew=2,
                    color=colors[solver], label=f"trp-{solver}: seeds and mean")  # fmt: skip
    ax_gap.axhline(0.0, color="black", lw=1)
    ax_gap.set_xticks(range(len(energies)), [f"{e:g}" for e in energies])
    ax_gap.set_xlabel("TRP energy")
    ax_gap.set_ylabel("test accuracy: TRP minus post-hoc at the same ranks")
    ax_gap.set_title("paired by seed (> 0: TRP better)")
    ax_gap.grid(alpha=0.3, axis="y")
    ax_gap.legend(fontsize=8)

    tallest = 0.0
    for i, solver in enumerate(solvers):
        rows = by_arm[f"trp-{solver}"]
        positions = [j + (i - (len(solvers) - 1) / 2) * width for j in range(len(rows))]
        total = [r["train_time_s"]["mean"] for r in rows]
        projection = [r["projection_time_s"]["mean"] for r in rows]
        tallest = max(tallest, *total)
        ax_time.bar(positions, total, width, color=colors[solver], alpha=0.35,
                    label=f"trp-{solver}: whole loop")  # fmt: skip
        ax_time.bar(positions, projection, width, color=colors[solver],
                    label=f"trp-{solver}: projections")  # fmt: skip
    baseline_time = by_arm["baseline"][0]["train_time_s"]["mean"]
    ax_time.axhline(baseline_time, color="black", lw=1, label="baseline (no TRP)")
    ax_time.set_ylim(0, 1.4 * max(tallest, baseline_time))  # room for the legend
    ax_time.set_xticks(range(len(energies)), [f"{e:g}" for e in energies])
    ax_time.set_xlabel("TRP energy")
    ax_time.set_ylabel("training wall time, s (mean over seeds)")
    threads = record["environment"]["torch_num_threads"]
    ax_time.set_title(f"training time, CPU, {threads} thread{'s' * (threads != 1)}")
    ax_time.grid(alpha=0.3, axis="y")
    ax_time.legend(fontsize=8, ncol=2, loc="upper center")

    plots.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.trp", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="result directory")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--variant", choices=image.VARIANTS, default="cifar10-lenet5")
    parser.add_argument("--size", choices=tuple(image.SIZES), default="quick")
    parser.add_argument(
        "--epochs", type=_cli.positive_int, default=None, help="default: the size's epochs"
    )
    parser.add_argument(
        "--lr",
        type=_cli.positive_float,
        default=None,
        help="default: the image task's full-sgd rate",
    )
    parser.add_argument(
        "--seeds", type=_cli.positive_int, default=3, help="seeds 0..S-1 (default 3)"
    )
    parser.add_argument("--energies", type=_cli.fraction, nargs="+", default=list(DEFAULT_ENERGIES))
    parser.add_argument("--solvers", choices=SOLVERS, nargs="+", default=list(SOLVERS))
    parser.add_argument(
        "--post-hoc-energies",
        type=_cli.fraction,
        nargs="+",
        default=list(DEFAULT_POST_HOC_ENERGIES),
    )
    parser.add_argument("--period", type=_cli.positive_int, default=1, help="TRP projection period")
    parser.add_argument(
        "--nuclear-weight", type=_cli.non_negative_float, default=0.0, help="TRP's λ (default 0)"
    )
    parser.add_argument(
        "--sweeps", type=_cli.positive_int, default=2, help="LoRSum sweeps per warm truncation"
    )
    parser.add_argument(
        "--threads", type=_cli.positive_int, default=1,
        help="torch threads (default 1: the other core may be busy)",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="rerun even if the result exists")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    lr = image.default_learning_rate(args.variant, "full-sgd") if args.lr is None else args.lr
    config = {
        "variant": args.variant,
        "size": args.size,
        "epochs": args.epochs or image.SIZES[args.size][1],
        "batch": image.BATCH,
        "lr": lr,
        "dense_lr": DENSE_LR,
        "seeds": args.seeds,
        "energies": args.energies,
        "solvers": args.solvers,
        "post_hoc_energies": args.post_hoc_energies,
        "period": args.period,
        "nuclear_weight": args.nuclear_weight,
        "sweeps": args.sweeps,
        "threads": args.threads,
        "data_dir": str(args.data_dir),
    }
    path = args.out_dir / f"{args.variant}.json"
    record = None if args.force else _results.load_current(path, config)
    if record is None:
        record = run(config)
        _results.write_json_atomic(path, record)
    elif record["summary"] != (summary := summarize(record["results"])):
        # The summary is a function of the stored runs: refresh it without training again.
        record["summary"] = summary
        _results.write_json_atomic(path, record)
    print(format_table(record["summary"]))
    print(f"wall time {record['wall_time_s']:.0f} s; wrote {path}")
    if not args.no_plot:
        png = path.with_suffix(".png")
        plot(record, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
