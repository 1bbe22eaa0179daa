"""The LoRD benchmark (``benchmarks/lord.py``) on a tiny Llama and fake WikiText-2 files.

Covers: a whole run (the JSON's fields, the plot, the skip of an unchanged config), parameter
counts and perplexities that the compressed model reproduces, the rank rules against
``compress_model``, full rank reproducing the baseline perplexity, the feature variant's use of
its calibration (output error at most the SVD variant's, equal to ``compress_model``'s and to a
direct computation on the layer's inputs), the solver study (the exact solver is optimal), and the
errors. Nothing needs the network, SmolLM2 or the real dataset.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from benchmarks import _results, lord, pretrained
from benchmarks.tasks import lm
from torch import nn

from lorsum.compression import LowRankLinear, collect_output_statistics, compress_model
from tests.test_benchmarks_lm import WORDS, _fake_wikitext, _tiny_tokenizer, build_tiny_llama

transformers = pytest.importorskip("transformers")

SEQ_LEN, BATCH, CALIB_BLOCKS, EVAL_TOKENS = 32, 4, 8, 512
ARGS = [
    "--param-fractions", "0.8", "0.5", "--rank-fractions", "0.3",
    "--solver-param-fractions", "0.5",
    "--solver-layers", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "lm_head",
    "--solver-ranks", "4", "8", "--solver-repeats", "1",
    "--calib-blocks", str(CALIB_BLOCKS), "--eval-tokens", str(EVAL_TOKENS),
    "--seq-len", str(SEQ_LEN), "--batch", str(BATCH),
]  # fmt: skip


def _tiny_llama() -> nn.Module:
    return build_tiny_llama().eval()


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return _tiny_llama()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _fake_wikitext(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model only loses from OpenMP hand-offs
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tiny, data, tmp_path_factory, one_thread):
    """One whole benchmark run with the tiny Llama in SmolLM2's place: (record, output dir)."""
    out = tmp_path_factory.mktemp("lord")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrained, "load_smollm2", lambda: (copy.deepcopy(tiny), _tiny_tokenizer()))
        assert lord.main([*ARGS, "--out-dir", str(out), "--data-dir", str(data)]) == 0
    record = json.loads((out / f"{lord.PART}.json").read_text(encoding="utf-8"))
    return record, out


@pytest.fixture(scope="module")
def inputs(tiny, data):
    """(test ids, calibration batches) exactly as the run built them."""
    folder = data / "wikitext-2"
    tokenizer = _tiny_tokenizer()
    test = lm.token_ids(folder / "test.txt", tokenizer)[:EVAL_TOKENS]
    valid = lm.token_ids(folder / "valid.txt", tokenizer)
    batches, _ = lord.calibration_batches(valid, CALIB_BLOCKS, SEQ_LEN, BATCH)
    return test, batches


@pytest.fixture(scope="module")
def moments(tiny, inputs):
    return collect_output_statistics(
        tiny, lambda n, _: n.rpartition(".")[2] in lord.TARGETS, inputs[1]
    )


def _points(record, solver="exact"):
    return [p for p in record["results"]["points"] if p["solver"] == solver]


def test_a_run_records_every_point_and_draws_the_plot(run, capsys):
    record, out = run
    assert record["suite"] == "lord"
    assert record["config_hash"] == _results.config_hash(record["config"])
    assert {"sha", "dirty"} <= set(record["environment"]["git"])
    assert {"lorsum", "torch", "transformers"} <= set(record["environment"]["versions"])
    assert record["environment"]["torch_num_threads"] == 1
    calibration = record["results"]["calibration"]
    assert calibration["blocks"] == CALIB_BLOCKS
    assert calibration["tokens"] == CALIB_BLOCKS * SEQ_LEN
    assert len(set(calibration["block_index"])) == CALIB_BLOCKS
    baseline = record["results"]["baseline"]
    assert math.isfinite(baseline["test_perplexity"])
    # Counted by hand: the tied embedding once, 2 layers of q, o (32x32), k, v (16x32),
    # gate, up, down (64x32) and two norms, then the final norm.
    per_layer = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 64 * 32
    assert baseline["targeted_params"] == 2 * per_layer
    assert baseline["model_params"] == len(WORDS) * 32 + 2 * (per_layer + 2 * 32) + 32
    # 3 levels x 2 variants with the exact solver, 1 level x 2 variants x 2 fast solvers
    points = record["results"]["points"]
    assert len(_points(record)) == 6
    assert len(points) == 10
    for p in points:
        assert p["layers"] == 2 * len(lord.TARGETS)
        assert set(p["ranks"]) == set(lord.TARGETS)
        assert p["rank_rule"]["rule"] in lord.RULES
        assert p["targeted_params_after"] < p["targeted_params_before"]
        assert p["targeted_params_before"] == baseline["targeted_params"]
        assert p["model_params_before"] == baseline["model_params"]
        assert math.isfinite(p["test_perplexity"])
        assert all(e is not None for e in p["output_error_mean"].values())
    assert len(record["summary"]["points"]) == len(points)
    png = out / f"{lord.PART}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same config again: the stored record is used, not recomputed.
    before = (out / f"{lord.PART}.json").read_bytes()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrained, "load_smollm2", pytest.fail)
        assert lord.main([*ARGS, "--out-dir", str(out), "--no-plot"]) == 0
    assert (out / f"{lord.PART}.json").read_bytes() == before
    assert "skipped" in capsys.readouterr().err


def test_recorded_parameters_and_perplexity_are_those_of_the_compressed_model(
    run, tiny, inputs, moments
):
    record, _ = run
    test, _ = inputs
    for p in _points(record):
        model = copy.deepcopy(tiny)
        rule = p["rank_rule"]
        entries = lord.compress(
            model, rule["rule"], rule["value"], method=p["method"], moments=moments
        )
        replaced = [m for m in model.modules() if isinstance(m, LowRankLinear)]
        assert len(replaced) == p["layers"]
        assert (
            sum(q.numel() for m in replaced for q in m.parameters()) == (p["targeted_params_after"])
        )
        assert lord.count_parameters(model) == p["model_params_after"]
        assert p["model_params_before"] - p["model_params_after"] == (
            p["targeted_params_before"] - p["targeted_params_after"]
        )
        assert p["model_param_reduction"] == pytest.approx(
            1 - p["model_params_after"] / p["model_params_before"], rel=1e-12
        )
        assert {e["name"].rpartition(".")[2]: e["rank"] for e in entries} == p["ranks"]
        ppl = lm.perplexity(model, test, SEQ_LEN, BATCH)
        assert ppl == pytest.approx(p["test_perplexity"], rel=1e-6), (p["method"], rule)


def test_param_fraction_keeps_at_most_that_share_of_every_layer():
    for m, n in [(576, 576), (192, 576), (1536, 576), (576, 1536), (16, 32)]:
        for keep in (0.98, 0.9, 0.5, 0.1):
            r = lord.layer_rank("param_fraction", keep, m, n)
            assert r * (m + n) <= keep * m * n < (r + 1) * (m + n), (m, n, keep, r)


@pytest.mark.parametrize("method", lord.METHODS)
def test_rank_fraction_is_compress_model_s_rule_and_gives_its_factors(
    method, tiny, inputs, moments
):
    ours, theirs = copy.deepcopy(tiny), copy.deepcopy(tiny)
    entries = lord.compress(ours, "rank_fraction", 0.3, method=method, moments=moments)
    report = compress_model(
        theirs, list(lord.TARGETS), rank_fraction=0.3, method=method, calibration=inputs[1]
    )
    assert [e["name"] for e in entries] == [c.name for c in report.layers]
    assert [e["rank"] for e in entries] == [c.rank for c in report.layers]
    assert [e["params_after"] for e in entries] == [c.params_after for c in report.layers]
    modules = dict(theirs.named_modules())
    for name, layer in ours.named_modules():
        if isinstance(layer, LowRankLinear):
            torch.testing.assert_close(layer.merged_weight(), modules[name].merged_weight())
    for entry, layer in zip(entries, report.layers, strict=True):
        # Both compute the calibration-output error from the same moments, differently
        # arranged: equal to float64 rounding of quantities of order 1.
        assert entry["output_error"] == pytest.approx(layer.output_error, rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("method", lord.METHODS)
def test_full_rank_reproduces_the_baseline_perplexity(method, run, tiny, inputs, moments):
    record, _ = run
    model = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match=r"does not reduce its parameters"):
        lord.compress(model, "rank_fraction", 1.0, method=method, moments=moments)
    entries = lord.compress(
        model, "rank_fraction", 1.0, method=method, moments=moments, require_compression=False
    )
    assert all(e["weight_error"] < 1e-5 for e in entries), max(e["weight_error"] for e in entries)
    ppl = lm.perplexity(model, inputs[0], SEQ_LEN, BATCH)
    baseline = record["results"]["baseline"]["test_perplexity"]
    # float32 factors of a float32 weight: the logits move by rounding only.
    assert ppl == pytest.approx(baseline, rel=1e-4)


def test_the_feature_variant_fits_its_calibration_outputs_better(run, tiny, inputs, moments):
    record, _ = run
    # In the run: every level, every projection type, the mean error over layers.
    by_level: dict[tuple, dict[str, dict]] = {}
    for p in _points(record):
        key = (p["rank_rule"]["rule"], p["rank_rule"]["value"])
        by_level.setdefault(key, {})[p["method"]] = p["output_error_mean"]
    for level, errors in by_level.items():
        for kind, svd_error in errors["svd"].items():
            assert errors["feature"][kind] <= svd_error * (1 + 1e-9), (level, kind)
    # Per layer at equal rank, strictly better somewhere: the calibration changed the factors.
    svd = lord.compress(copy.deepcopy(tiny), "param_fraction", 0.5, method="svd", moments=moments)
    model = copy.deepcopy(tiny)
    feature = lord.compress(model, "param_fraction", 0.5, method="feature", moments=moments)
    for a, b in zip(feature, svd, strict=True):
        assert a["rank"] == b["rank"]
        assert a["output_error"] <= b["output_error"] * (1 + 1e-9), a["name"]
    assert sum(a["output_error"] for a in feature) < 0.95 * sum(b["output_error"] for b in svd)

    # The recorded error is the one seen on the calibration tokens themselves.
    name = "model.layers.1.mlp.up_proj"
    seen: list[torch.Tensor] = []
    original = tiny.get_submodule(name)
    handle = original.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for batch in inputs[1]:
                tiny(**batch)
    finally:
        handle.remove()
    x = torch.cat(seen).flatten(0, -2).double()
    y = x @ original.weight.detach().double().mT
    with torch.no_grad():
        y_low = model.get_submodule(name)(x.float()).double()
    direct = ((y - y_low).square().sum() / y.square().sum()).sqrt()
    recorded = next(a["output_error"] for a in feature if a["name"] == name)
    assert recorded == pytest.approx(float(direct), rel=1e-4)


def test_the_exact_solver_is_optimal_in_the_solver_study(run):
    record, _ = run
    rows = record["results"]["solver_rows"]
    assert {r["solver"] for r in rows} == set(lord.SOLVERS)
    assert {r["layer"] for r in rows if r["method"] == "svd"} == {
        "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "lm_head",
    }  # fmt: skip
    # lm_head has no calibration moments: the feature variant leaves it out, and says so.
    assert "lm_head" not in {r["layer"] for r in rows if r["method"] == "feature"}
    assert "lm_head" in record["notes"]["solver_skipped"]
    exact = {(r["layer"], r["method"], r["rank"]): r for r in rows if r["solver"] == "exact"}
    for r in rows:
        best = exact[(r["layer"], r["method"], r["rank"])]
        assert r["time_s"]["repeats"] == 1
        # Eckart–Young for svd, Ky Fan for feature: no solver beats the exact decomposition.
        key = "weight_error" if r["method"] == "svd" else "output_error"
        assert best[key] <= r[key] * (1 + 1e-6) + 1e-7, (r["layer"], r["solver"], key)
    summary = record["summary"]["solvers"]
    assert {(s["method"], s["solver"]) for s in summary} == {
        (m, s) for m in lord.METHODS for s in lord.SOLVERS
    }
    for s in summary:
        if s["solver"] == "exact":
            assert s["weight_error_excess_mean"] == 0


def test_bad_values_are_clear_errors(tiny, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"Invalid rank rule: 'energy'"):
        lord.layer_rank("energy", 0.5, 4, 4)
    with pytest.raises(ValueError, match=r"Invalid param_fraction: 1.5 \(must be in \(0, 1\]\)"):
        lord.layer_rank("param_fraction", 1.5, 4, 4)
    with pytest.raises(ValueError, match=r"needs calibration moments for layer 'model.layers.0"):
        lord.compress(copy.deepcopy(tiny), "param_fraction", 0.5, method="feature")
    with pytest.raises(ValueError, match=r"the model has no nn.Linear named one of q_proj"):
        lord.target_layers(nn.Sequential(nn.Linear(4, 4)))
    config = {"methods": ["svd"], "solver_options": {"seed": 0, "num_iters": 1,
              "oversamples": 2, "power_iters": 1}}  # fmt: skip
    for layers, ranks, match in [
        (["model.norm"], [2], r"'model.norm' is not an nn.Linear \(LlamaRMSNorm\)"),
        (["model.layers.0.self_attn.k_proj"], [17], r"rank 17 exceeds min\(m, n\) = 16"),
    ]:
        config["solver_study"] = {"layers": layers, "ranks": ranks, "repeats": 1}
        with pytest.raises(ValueError, match=match):
            lord.solver_study(tiny, {}, config)
    with pytest.raises(ValueError, match=r"calibration needs 10 blocks of 32 tokens but"):
        lord.calibration_batches(torch.arange(100), 10, 32, 4)

    monkeypatch.setattr(pretrained, "load_smollm2", pytest.fail)  # data are checked first
    with pytest.raises(FileNotFoundError, match=r"WikiText-2 file not found: .*valid\.txt"):
        lord.main(["--out-dir", str(tmp_path), "--data-dir", str(tmp_path), "--no-plot"])
    for argv, message in [
        (["--param-fractions", "1.5"], "must be a number in (0, 1], got '1.5'"),
        (["--param-fractions", "--rank-fractions"], "no compression level"),
        (["--methods", "pca"], "invalid choice: 'pca'"),
    ]:
        with pytest.raises(SystemExit):
            lord.main([*argv, "--out-dir", str(tmp_path)])
        assert message in capsys.readouterr().err
