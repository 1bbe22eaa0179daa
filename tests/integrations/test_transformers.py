"""lorsum optimizers under the transformers ``Trainer``, on a tiny PEFT BERT built from a config.

Covers the three ways the Trainer takes an optimizer (a built one, ``optimizer_cls_and_kwargs``
with the class, and the transformers-5 optimizer factory), gradient accumulation inside the
Trainer, checkpoint save and exact resume (optimizer state loaded with ``weights_only=True``),
and the argument checks of :mod:`lorsum.integrations.transformers`.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorsum  # noqa: E402
from lorsum.integrations.peft import lora_pairs, param_groups  # noqa: E402
from lorsum.integrations.transformers import (  # noqa: E402
    OptimizerFactory,
    check_training_arguments,
    optimizer_cls_and_kwargs,
)
from tests.integrations.tiny_models import SEQ, VOCAB, bert_config  # noqa: E402

LORSUM = {"lr": 0.05, "num_iters": 1, "damping": 1e-3}


def peft_bert(seed: int = 0, lora_dropout: float = 0.1) -> nn.Module:
    config = bert_config()
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        lora_dropout=lora_dropout,
        task_type="SEQ_CLS",
    )
    with torch.random.fork_rng():  # model init draws from the global generator: keep it local
        torch.manual_seed(seed)
        return peft.get_peft_model(transformers.BertForSequenceClassification(config), lora)


def peft_llama(seed: int = 0) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ,
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)


class TinyDataset(torch.utils.data.Dataset):
    """Random token sequences whose label is the parity of the first token."""

    def __init__(self, size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (size, SEQ), generator=g)
        self.labels = self.input_ids[:, 0] % 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


class TinyCausalDataset(TinyDataset):
    """Random token sequences as their own language-modelling labels."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.input_ids[i]}


def training_arguments(tmp_path, **overrides) -> transformers.TrainingArguments:
    options = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "learning_rate": LORSUM["lr"],
        "max_grad_norm": 0.0,  # the lorsum optimizer clips the full gradient itself
        "logging_steps": 1,
        "save_strategy": "no",
        "use_cpu": True,
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
    }
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def lora_factors(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for pair in lora_pairs(model) for t in (pair.A, pair.B)]


def unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def check_trained(trainer, model: nn.Module, before: list[torch.Tensor]) -> None:
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert trainer.state.global_step == 3
    assert len(losses) == 3
    assert all(torch.isfinite(torch.tensor(losses)))
    after = lora_factors(model)
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    optimizer = unwrap(trainer.optimizer)
    assert isinstance(optimizer, lorsum.LoRSum)
    assert all(
        int(optimizer.state[g["params"][1]]["step"]) == 3 for g in optimizer.param_groups[:4]
    )


def test_trainer_with_a_built_optimizer(tmp_path):
    model = peft_bert()
    before = lora_factors(model)
    pairs = lora_pairs(model)
    with lorsum.GradientCapture(pairs) as capture:
        optimizer = lorsum.LoRSum(param_groups(model, pairs, **LORSUM), capture=capture)
        trainer = transformers.Trainer(
            model=model,
            args=training_arguments(tmp_path),
            train_dataset=TinyDataset(),
            optimizers=(optimizer, None),
        )
        trainer.train()
    check_trained(trainer, model, before)


def test_trainer_with_the_optimizer_class_and_kwargs(tmp_path):
    model = peft_bert()
    before = lora_factors(model)
    pairs = lora_pairs(model)
    with lorsum.GradientCapture(pairs) as capture:
        kwargs = {"params": param_groups(model, pairs), "capture": capture, **LORSUM}
        trainer = transformers.Trainer(
            model=model,
            args=training_arguments(tmp_path),
            train_dataset=TinyDataset(),
            optimizer_cls_and_kwargs=(lorsum.LoRSum, kwargs),
        )
        trainer.train()
    check_trained(trainer, model, before)


def test_trainer_with_the_optimizer_factory(tmp_path):
    pytest.importorskip("lorsum.factory")
    model = peft_bert()
    before = lora_factors(model)
    trainer = transformers.Trainer(
        model=model,
        args=training_arguments(tmp_path),
        train_dataset=TinyDataset(),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("lorsum", max_grad_norm=1.0, **LORSUM),
    )
    trainer.train()
    optimizer = unwrap(trainer.optimizer)
    assert optimizer.max_grad_norm == 1.0
    assert [p.name for p in optimizer.capture.pairs] == [p.name for p in lora_pairs(model)]
    optimizer.capture.remove()
    check_trained(trainer, model, before)


def test_gradient_accumulation_in_the_trainer_equals_one_large_batch(tmp_path):
    # A causal LM: its loss is normalised by the number of label tokens of the whole
    # accumulated batch (num_items_in_batch), so 2 micro-batches of 2 are one batch of 4.
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = peft_llama()
        pairs = lora_pairs(model)
        with lorsum.GradientCapture(pairs) as capture:
            optimizer = lorsum.LoRSum(param_groups(model, pairs, **LORSUM), capture=capture)
            args = training_arguments(
                tmp_path / f"run{accumulation}",
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
            )
            dataset = TinyCausalDataset()
            trainer = transformers.Trainer(
                model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None)
            )
            trainer.train()
        results.append(lora_factors(model))
    for accumulated, one in zip(*results, strict=True):
        # float32: the two runs differ by the order of the summations only
        torch.testing.assert_close(accumulated, one, rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_continues_exactly(tmp_path):
    hparams = {**LORSUM, "momentum": 0.9}  # momentum factors must survive the checkpoint

    def run(max_steps: int, resume: str | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = peft_bert()
        pairs = lora_pairs(model)
        with lorsum.GradientCapture(pairs) as capture:
            optimizer = lorsum.LoRSum(param_groups(model, pairs, **hparams), capture=capture)
            optimizer.register_step_post_hook(lambda *_: steps_taken.append(1))
            args = training_arguments(
                tmp_path / "out", max_steps=max_steps, save_strategy="steps", save_steps=2
            )
            trainer = transformers.Trainer(
                model=model, args=args, train_dataset=TinyDataset(), optimizers=(optimizer, None)
            )
            trainer.train(resume_from_checkpoint=resume)
        return model, optimizer

    steps_taken: list[int] = []
    straight, _ = run(4)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("momentum_buffer" in s for s in state["state"].values())
    steps_taken.clear()
    resumed, optimizer = run(4, resume=str(checkpoint))
    # the resumed run took steps 3 and 4 only, from the loaded model and optimizer state
    assert len(steps_taken) == 2
    assert all(
        int(optimizer.state[g["params"][1]]["step"]) == 4 for g in optimizer.param_groups[:4]
    )
    for p, ref in zip(lora_factors(resumed), lora_factors(straight), strict=True):
        torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-7)


# --- the argument checks -----------------------------------------------------------------------


def args_namespace(**overrides) -> SimpleNamespace:
    options = {"fsdp": "", "deepspeed": None, "world_size": 1, "n_gpu": 0, "max_grad_norm": 0.0}
    options.update(overrides)
    return SimpleNamespace(**options)


def test_trainer_clipping_with_a_capture_based_optimizer_warns():
    with pytest.warns(UserWarning, match=r"max_grad_norm=1\.0\) clips p\.grad only"):
        check_training_arguments(args_namespace(max_grad_norm=1.0), "lorsum")
    check_training_arguments(args_namespace(max_grad_norm=1.0), "precond_adamw")  # uses p.grad
    check_training_arguments(args_namespace(), "lorsum")


def test_data_parallel_in_one_process_fsdp_and_deepspeed_are_refused():
    check_training_arguments(args_namespace(world_size=2, n_gpu=1), "lorsum")  # DDP: exact
    with pytest.raises(NotImplementedError, match=r"n_gpu=2 in one process means nn.DataParallel"):
        check_training_arguments(args_namespace(n_gpu=2), "lorsum")
    with pytest.raises(NotImplementedError, match=r"deepspeed='ds.json'.*use DDP"):
        check_training_arguments(args_namespace(deepspeed="ds.json"), "lorsum")
    with pytest.raises(NotImplementedError, match=r"fsdp='full_shard'"):
        check_training_arguments(args_namespace(fsdp="full_shard"), "precond_sgd")
    check_training_arguments(args_namespace(fsdp="full_shard"), "adamw")  # torch's own AdamW


def test_check_training_arguments_reads_a_built_optimizer():
    model = peft_bert()
    pairs = lora_pairs(model)
    with lorsum.GradientCapture(pairs) as capture:
        optimizer = lorsum.LoRSum(param_groups(model, pairs), capture=capture)
        with pytest.warns(UserWarning, match="clips p.grad only"):
            check_training_arguments(args_namespace(max_grad_norm=1.0), optimizer)


def test_an_unknown_method_is_refused():
    pytest.importorskip("lorsum.factory")
    with pytest.raises(ValueError, match=r"Unknown method: 'adam'"):
        optimizer_cls_and_kwargs("adam")
    assert optimizer_cls_and_kwargs("svdlora", lr=1.0) == (
        OptimizerFactory,
        {"method": "svdlora", "lr": 1.0},
    )
