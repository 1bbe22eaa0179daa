"""The transformers ``Trainer`` under DDP (2 CPU processes, gloo) with lorsum's optimizers.

Each process runs ``Trainer.train()`` on half of every batch; the factors must equal those of one
process whose batch is the whole dataset (float64), and be identical on both ranks. A batch holds
the whole dataset, so the samplers' different orders change only the order of summation.

The model is a causal LM: its loss is normalised by the label tokens of the global batch
(``num_items_in_batch``), so the Trainer's ``loss × world_size`` under DDP is right. A model whose
loss ignores ``num_items_in_batch`` (``BertForSequenceClassification`` in transformers 5.24) gets
``world_size`` times the gradient from that rule, in ``.grad`` and in the capture alike.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorsum.integrations.peft import lora_pairs  # noqa: E402
from lorsum.integrations.transformers import optimizer_cls_and_kwargs  # noqa: E402
from tests.integrations.test_transformers import TinyCausalDataset, peft_llama  # noqa: E402
from tests.spawn import spawn_and_wait  # noqa: E402

WORLD, DATASET, EPOCHS = 2, 8, 3
TIMEOUT_S = 240
METHODS = {
    "lorsum": {"lr": 0.05, "num_iters": 1, "damping": 1e-3},
    "scaled_lorsum": {"lr": 0.01, "num_iters": 1},
}


def train(
    method: str, out: Path, *, per_device: int, distributed: bool = False
) -> dict[str, torch.Tensor]:
    model = peft_llama().double()
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=per_device,
        num_train_epochs=EPOCHS,
        max_grad_norm=0.0,  # the Trainer would clip p.grad only (see integrations/transformers)
        save_strategy="no",
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo" if distributed else None,  # the launcher's environment does the rest
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TinyCausalDataset(size=DATASET),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(method, **METHODS[method]),
    )
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    optimizer.capture.remove()
    if trainer.state.global_step != EPOCHS:
        raise RuntimeError(f"expected {EPOCHS} steps, got {trainer.state.global_step}")
    return {
        pair.name + suffix: factor.detach().clone()
        for pair in lora_pairs(model)
        for suffix, factor in ((".A", pair.A), (".B", pair.B))
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    try:
        results = {
            m: train(m, Path(out_dir) / m, per_device=DATASET // WORLD, distributed=True)
            for m in METHODS
        }
        path = Path(out_dir) / f"rank{rank}.pt"
        torch.save(results, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, dict[str, torch.Tensor]]]:
    with tempfile.TemporaryDirectory() as tmp:
        spawn_and_wait(_worker, (_free_port(), tmp), WORLD, timeout_s=TIMEOUT_S,
                       what="the Trainer's DDP workers")  # fmt: skip
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_ddp_equals_one_process_on_the_global_batch(ranks, method, tmp_path):
    expected = train(method, tmp_path, per_device=DATASET)
    for name, value in ranks[0][method].items():
        err = float((value - expected[name]).norm() / expected[name].norm())
        # float64: the ranks and the single process sum the same terms in other orders
        assert err <= 1e-10, f"{method}: {name} rel_err {err:.3e} > 1e-10 (float64)"


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_ddp_ranks_hold_identical_factors(ranks, method):
    for name, value in ranks[0][method].items():
        assert torch.equal(value, ranks[1][method][name]), f"{method}: {name} differs"
