"""The TRP benchmark (``benchmarks/trp.py``) on tiny models and fake data: the result file and its
fields, the split model against the truncated one, the parameter counts, post-hoc truncation at
energy 1 and at given ranks, the target layers, and the errors of the command line."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from benchmarks import trp as bench
from benchmarks.models import LeNet5, PatchMLP
from benchmarks.tasks import image
from torch import nn

from lorsum.compression import TrainedRankPruning
from lorsum.compression.trp import matrix_view
from lorsum.functional import energy_truncation
from tests.test_benchmarks_image import _fake_fashion

VARIANT = "fashion-lenet5"
TARGETS = ["features.3", "classifier.0", "classifier.2"]  # conv 16×150, linears 120×400, 84×120


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the benchmark runs by default: with the other core busy, two
    threads wait on each other and these tests become a hundred times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_data(dtype: torch.dtype, *, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "train_x": torch.randn(128, 1, 32, 32, generator=generator, dtype=dtype),
        "train_y": torch.randint(0, 10, (128,), generator=generator),
        "test_x": torch.randn(200, 1, 32, 32, generator=generator, dtype=dtype),
        "test_y": torch.randint(0, 10, (200,), generator=generator),
    }


def _trained_trp(solver: str, energy: float = 0.9) -> tuple[TrainedRankPruning, dict]:
    """A float64 LeNet-5 after 4 TRP steps on random data (float64: the comparisons below are
    then limited by rounding, not by float32's differing SVDs)."""
    torch.manual_seed(0)
    model = LeNet5(1).double()
    data = _random_data(torch.float64)
    trp = TrainedRankPruning(model, TARGETS, energy=energy, solver=solver)
    bench.train_model(model, data, variant=VARIANT, lr=0.1, epochs=2, seed=0, trp=trp)
    return trp, data


def test_run_writes_a_result_file_and_plot_with_every_arm(tmp_path, monkeypatch):
    _fake_fashion(tmp_path / "data")  # 3 images per class: one step per epoch
    out = tmp_path / "out"
    argv = [
        "--variant", VARIANT, "--data-dir", str(tmp_path / "data"), "--out-dir", str(out),
        "--seeds", "2", "--energies", "0.9", "0.6", "--post-hoc-energies", "0.9", "1.0",
        "--epochs", "2", "--threads", "1",
    ]  # fmt: skip
    assert bench.main(argv) == 0
    record = json.loads((out / f"{VARIANT}.json").read_text())
    assert record["suite"] == "trp"
    assert record["part"] == VARIANT
    assert record["seeds"] == [0, 1]
    assert set(record["environment"]["git"]) == {"sha", "dirty"}
    assert {"lorsum", "torch"} <= set(record["environment"]["versions"])
    assert record["config"]["energies"] == [0.9, 0.6]
    assert record["config"]["threads"] == 1
    assert record["environment"]["torch_num_threads"] == 1
    assert len(record["config_hash"]) == 64
    runs = record["results"]
    arms = {(r["arm"], r["energy"]) for r in runs}
    expected = {("baseline", None), ("post-hoc", 0.9), ("post-hoc", 1.0)} | {
        (f"{arm}{solver}", e)
        for arm in ("trp-", "post-hoc@trp-")
        for solver in bench.SOLVERS
        for e in (0.9, 0.6)
    }
    assert arms == expected
    assert len(runs) == 2 * len(expected)
    for r in runs:
        assert 0.0 <= r["test_accuracy"] <= 1.0
        if r["arm"] != "baseline":
            assert list(r["ranks"]) == TARGETS
            assert r["parameters"]["targets_before"] == 16 * 150 + 16 + 120 * 400 + 120 + 84 * 121
            assert r["parameter_reduction"] == pytest.approx(1 - r["parameters_kept"])
            for layer in r["layers"]:
                assert 1 <= layer["rank"] <= layer["full_rank"] == min(layer["shape"])
        if r["arm"].startswith("trp-"):
            assert r["steps"] == 2
            assert 0.0 < r["projection_time_s"] < r["train_time_s"]
            assert r["svd_calls"] + r["warm_calls"] == 2 * len(TARGETS)  # period 1, 2 steps
    by_key = {(r["arm"], r["energy"], r["seed"]): r for r in runs}
    for (arm, energy, seed), r in by_key.items():
        if arm.startswith("trp-"):  # the post-hoc comparison at the same ranks
            assert by_key[("post-hoc@" + arm, energy, seed)]["ranks"] == r["ranks"]
        if arm == "post-hoc" and energy == 1.0:  # splitting alone changes no prediction
            assert r["test_accuracy"] == by_key[("baseline", None, seed)]["test_accuracy"]
    rows = {(row["arm"], row["energy"]): row for row in record["summary"]}
    assert set(rows) == expected
    for (arm, energy), row in rows.items():
        if arm.startswith("trp-"):  # paired by seed with the same-rank post-hoc split
            assert row["minus_post_hoc_same_ranks"]["per_seed"] == [
                by_key[(arm, energy, seed)]["test_accuracy"]
                - by_key[("post-hoc@" + arm, energy, seed)]["test_accuracy"]
                for seed in (0, 1)
            ]
    lorsum_row = rows[("trp-lorsum", 0.9)]
    assert lorsum_row["test_accuracy"]["mean"] == pytest.approx(
        sum(lorsum_row["test_accuracy_per_seed"]) / 2
    )
    assert (out / f"{VARIANT}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same config: the stored record is reused, nothing is trained again.
    monkeypatch.setattr(bench, "run", lambda config: pytest.fail("re-ran a stored config"))
    assert bench.main([*argv, "--no-plot"]) == 0


@pytest.mark.parametrize("solver", bench.SOLVERS)
def test_split_model_computes_what_the_truncated_model_computes(solver):
    trp, data = _trained_trp(solver)
    dense = copy.deepcopy(trp.model)
    truncated = copy.deepcopy(trp.model)
    ranks = {}
    with torch.no_grad():
        for name in TARGETS:
            weight = truncated.get_submodule(name).weight
            truncation = energy_truncation(matrix_view(weight), 0.9)
            weight.copy_(truncation.weight().reshape(weight.shape))
            ranks[name] = truncation.rank
    result = bench.finish_trp(trp, data)
    assert result["ranks"] == ranks
    assert all(k < min(matrix_view(dense.get_submodule(n).weight).shape) for n, k in ranks.items())
    x = data["test_x"][:32]
    with torch.no_grad():
        expected, got, untruncated = truncated(x), trp.model(x), dense(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # Not vacuous: the truncation does change the outputs.
    assert (untruncated - expected).abs().max() > 1e-6
    assert not any(isinstance(trp.model.get_submodule(n), nn.Linear | nn.Conv2d) for n in TARGETS)


def test_reported_parameter_counts_match_the_modules():
    trp, data = _trained_trp("svd")
    dense = copy.deepcopy(trp.model)
    result = bench.finish_trp(trp, data)
    split = trp.model

    def count(model, names):
        return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())

    assert result["parameters"] == {
        "targets_before": count(dense, TARGETS),
        "targets_after": count(split, TARGETS),
        "model_before": sum(p.numel() for p in dense.parameters()),
        "model_after": sum(p.numel() for p in split.parameters()),
    }
    for layer in result["layers"]:
        assert layer["parameters_before"] == count(dense, [layer["name"]])
        assert layer["parameters_after"] == count(split, [layer["name"]])
    assert result["parameters"]["targets_after"] < result["parameters"]["targets_before"]
    assert result["parameters_kept"] == count(split, TARGETS) / count(dense, TARGETS)


def test_post_hoc_truncation_at_energy_one_leaves_accuracy_unchanged():
    torch.manual_seed(0)
    model = LeNet5(1).double()
    data = _random_data(torch.float64)
    bench.train_model(model, data, variant=VARIANT, lr=0.1, epochs=2, seed=0)
    accuracy = image.evaluate(model, data["test_x"], data["test_y"])
    split, reports = bench.post_hoc(model, TARGETS, energy=1.0)
    assert [r.rank for r in reports] == [min(r.shape) for r in reports]
    assert image.evaluate(split, data["test_x"], data["test_y"]) == accuracy
    with torch.no_grad():
        torch.testing.assert_close(split(data["test_x"]), model(data["test_x"]))
    lower, _ = bench.post_hoc(model, TARGETS, energy=0.5)
    with torch.no_grad():
        assert (lower(data["test_x"]) - model(data["test_x"])).abs().max() > 1e-3


def test_post_hoc_keeps_exactly_the_requested_ranks():
    torch.manual_seed(1)
    model = LeNet5(1)
    ranks = {"features.3": 3, "classifier.0": 7, "classifier.2": 1}
    split, reports = bench.post_hoc(model, TARGETS, ranks=ranks)
    assert {r.name: r.rank for r in reports} == ranks
    assert split.get_submodule("classifier.0").rank == 7
    assert isinstance(model.get_submodule("classifier.0"), nn.Linear)  # the original is kept
    with pytest.raises(ValueError, match=r"rank must be in \[1, 84\], got 0"):
        bench.post_hoc(model, TARGETS, ranks={**ranks, "classifier.2": 0})
    with pytest.raises(ValueError, match="give exactly one of energy and ranks"):
        bench.post_hoc(model, TARGETS, energy=0.9, ranks=ranks)
    with torch.no_grad():  # a rank-2 weight has no third direction to keep
        model.classifier[2].weight.copy_(torch.randn(84, 2) @ torch.randn(2, 120))
    with pytest.raises(RuntimeError, match=r"classifier\.2: .* kept rank 2, not the requested 3"):
        bench.post_hoc(model, TARGETS, ranks={**ranks, "classifier.2": 3})


def test_targets_skip_the_first_convolution_and_the_output_layer():
    assert bench.target_layers(LeNet5(3)) == TARGETS
    blocks = [f"blocks.{i}.{j}" for i in range(2) for j in (1, 3)]
    assert bench.target_layers(PatchMLP(3, dim=16, depth=2)) == blocks
    with pytest.raises(ValueError, match="at least 3 layers"):
        bench.target_layers(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--energies", "1.5"], r"must be a number in \(0, 1\], got '1.5'"),
        (["--post-hoc-energies", "0"], r"must be a number in \(0, 1\], got '0'"),
        (["--seeds", "0"], r"must be a positive integer, got '0'"),
        (["--lr", "-1"], r"must be a positive number, got '-1'"),
        (["--nuclear-weight", "nan"], r"must be a number >= 0, got 'nan'"),
        (["--solvers", "qr"], r"invalid choice: 'qr'"),
    ],
)
def test_bad_arguments_are_refused_with_the_value(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert re.search(message, capsys.readouterr().err)


def test_unknown_image_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown image size 'huge' \(choose from quick, full\)"):
        image.load_data(VARIANT, tmp_path, size="huge")
