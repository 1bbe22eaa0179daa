"""Data parallelism is exact: DDP ranks end with the factors of one process on the global batch.

Covers every method of :data:`lorsum.METHODS` under ``torch.nn.parallel.DistributedDataParallel``
on CPU (gloo, 2 and 3 processes, float64, a few steps, with and without gradient accumulation
through ``no_sync``): LoRSum (Jacobi, one and several sweeps, momentum and weight decay,
clipping, ``factor_grads=False``), ScaledLoRSum (K-FAC and Shampoo, diagonal and dense, with
momentum and clipping), SVDLoRA (exact with momentum, randomized), PrecondLoRA, LoRA-Pro, LoRA+
and AdamW. It checks that every rank holds bitwise the same factors, that a rank-local step
(``process_group=None``) is not exact (the test has teeth), that ``step_in_backward`` is refused
with several ranks, and the reducer's bookkeeping. Each world size is one spawn that runs every
case, so the whole module costs two process launches.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lorsum
from lorsum.distributed import MeanReducer, resolve_process_group
from tests.spawn import spawn_and_wait

GLOBAL_BATCH, STEPS, DIM, OUT = 12, 3, 16, 5
SPAWN_TIMEOUT_S = 240
BOUND = 1e-10  # float64, exact algebra: only the order of the cross-rank sums differs

# (name, method, hyperparameters of create_optimizer)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("lorsum-jacobi", "lorsum", {"lr": 0.2, "num_iters": 0, "damping": 1e-2}),
    ("lorsum-1", "lorsum", {"lr": 0.2, "num_iters": 1, "damping": 1e-3}),
    (
        "lorsum-3-momentum",
        "lorsum",
        {"lr": 0.1, "num_iters": 3, "damping": 1e-3, "momentum": 0.9, "weight_decay": 0.01},
    ),
    ("lorsum-clip", "lorsum", {"lr": 0.2, "num_iters": 2, "max_grad_norm": 0.02}),
    ("lorsum-factor-grads-off", "lorsum", {"lr": 0.2, "num_iters": 2, "factor_grads": False}),
    ("lorsum-no-foreach", "lorsum", {"lr": 0.2, "num_iters": 1, "foreach": False}),
    ("scaled-kfac-diagonal", "scaled_lorsum", {"lr": 0.01, "num_iters": 1}),
    (
        "scaled-kfac-dense",
        "scaled_lorsum",
        {"lr": 0.01, "num_iters": 0, "metric_form": "dense", "metric_damping": 1e-3},
    ),
    ("scaled-shampoo-diagonal", "scaled_lorsum", {"lr": 0.01, "metric": "shampoo"}),
    (
        "scaled-shampoo-dense-clip",
        "scaled_lorsum",
        {
            "lr": 0.01,
            "metric": "shampoo",
            "metric_form": "dense",
            "metric_damping": 1e-3,
            "max_grad_norm": 0.02,
        },
    ),
    ("scaled-kfac-sum-loss", "scaled_lorsum", {"lr": 0.01, "loss_reduction": "sum"}),
    ("svdlora-momentum", "svdlora", {"lr": 0.2, "momentum": 0.5}),
    ("svdlora-randomized", "svdlora", {"lr": 0.2, "svd": "randomized", "oversamples": 2}),
    ("precond-adamw", "precond_adamw", {"lr": 0.01}),
    ("lora-pro", "lora_pro", {"lr": 0.01}),
    ("loraplus", "loraplus", {"lr": 0.01}),
    ("adamw", "adamw", {"lr": 0.01}),
]
LOCAL_CONTROL = ("lorsum-local", "lorsum", {"lr": 0.2, "num_iters": 1, "process_group": None})


def make_model() -> tuple[nn.Module, list[lorsum.LoRAPair]]:
    """Three adapted layers (two of equal shape, so LoRSum stacks them) and a trainable bias."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, OUT)
        ).double()
        pairs = lorsum.add_lora(model, ["0", "2", "4"], rank=2, alpha=4.0)  # A: Kaiming init
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pair in pairs:  # not LoRA's zero B, so that every term of every step is exercised
            pair.B.copy_(0.3 * torch.randn(pair.B.shape, generator=g, dtype=torch.float64))
    model[4].base.bias.requires_grad_(True)  # a dense group, stepped by AdamW
    return model, pairs


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, OUT, generator=g, dtype=torch.float64)
    return x, y


def train(method: str, hparams: dict[str, Any], *, rank: int, world: int, accum: int):
    """``STEPS`` steps on this rank's share of each global batch; returns the trained tensors.

    ``world = 1`` is the single-process reference on the whole batch. Every loss is a mean, and
    each micro-batch's is divided by ``accum`` (the Trainer's convention), so that DDP's mean
    of the ranks' gradients is the gradient of the global batch's mean loss.
    """
    model, _ = make_model()
    hparams = dict(hparams)
    loss_sum = hparams.get("loss_reduction") == "sum"
    optimizer = lorsum.create_optimizer(model, method, dense_lr=0.01, **hparams)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        for j, (xb, yb) in enumerate(zip(x.chunk(accum), y.chunk(accum), strict=True)):
            last = j == accum - 1
            sync = net.no_sync() if world > 1 and not last else _Nothing()
            with sync:
                residual = net(xb) - yb
                if loss_sum:
                    # DDP averages over ranks: K × each rank's sum has the global sum's gradient.
                    loss = residual.square().sum() * world
                else:
                    loss = residual.square().mean() / accum
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if getattr(optimizer, "capture", None) is not None:
        optimizer.capture.remove()
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # 2 or 3 processes share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {}
        for name, method, hparams in [*CASES, LOCAL_CONTROL]:
            for accum in (1, 2):
                results[f"{name}/accum{accum}"] = train(
                    method, hparams, rank=rank, world=world, accum=accum
                )
        results["errors"] = _distributed_errors()
        results["reducer"] = _reducer_bookkeeping(rank, world)
        path = Path(out_dir) / f"rank{rank}.pt"
        torch.save(results, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # the parent never reads a partial file
        gc.collect()  # free the DDP wrappers' hold on gloo while the group exists
        dist.barrier()  # no rank leaves while another is inside its last collective
    finally:
        dist.destroy_process_group()


def _distributed_errors() -> dict[str, str]:
    model, _ = make_model()
    messages = {}
    try:
        lorsum.create_optimizer(model, "lorsum", step_in_backward=True)
    except ValueError as error:
        messages["step_in_backward"] = str(error)

    from torch.distributed.fsdp import fully_shard

    for method in ("lorsum", "precond_adamw"):
        # Built after sharding (the Trainer's order): the DTensor factors are refused at once.
        model, _ = make_model()
        for index in (0, 2, 4):
            fully_shard(model[index])
        try:
            lorsum.create_optimizer(model, method)
        except NotImplementedError as error:
            messages[f"fsdp2-{method}"] = str(error)
    # Built before sharding, its groups' entries then swapped for the DTensors (accelerate's
    # order): refused at the first step.
    model, _ = make_model()
    optimizer = lorsum.create_optimizer(model, "lorsum")
    for index in (0, 2, 4):
        fully_shard(model[index])
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        if group["kind"] == "lora":
            group["params"] = [sharded[f"{group['name']}.lora_A.weight"],
                               sharded[f"{group['name']}.lora_B.weight"]]  # fmt: skip
    try:
        optimizer.step()
    except NotImplementedError as error:
        messages["fsdp2-swapped"] = str(error)
    optimizer.capture.remove()
    return messages


def _reducer_bookkeeping(rank: int, world: int) -> dict[str, Any]:
    reducer = MeanReducer(resolve_process_group("auto"))
    same = reducer([torch.full((2, 3), float(rank), dtype=torch.float64), torch.ones(4) * rank])
    mixed = reducer(
        [torch.full((2, 3), float(rank), dtype=torch.float64), torch.tensor([rank + 1.0])]
    )
    # An optimizer must not hold the default group: it would outlive destroy_process_group()
    # for as long as the optimizer does (see MeanReducer).
    model, _ = make_model()
    optimizer = lorsum.create_optimizer(model, "lorsum")
    assert optimizer.reducer is not None
    held = [
        holder
        for holder in gc.get_referrers(dist.group.WORLD)
        if holder is vars(optimizer.reducer) or holder is optimizer._reducers
    ]
    optimizer.capture.remove()
    return {
        "same": same,
        "mixed": mixed,
        "calls": reducer.calls,
        "bytes": reducer.bytes_reduced,
        "holds_default_group": bool(held),
    }


def _spawn(world: int, tmp: Path) -> list[dict[str, Any]]:
    init_file, out_dir = tmp / "init", tmp / "out"
    out_dir.mkdir()
    spawn_and_wait(_worker, (world, str(init_file), str(out_dir)), world,
                   timeout_s=SPAWN_TIMEOUT_S, what=f"{world} gloo workers")  # fmt: skip
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        return _spawn(request.param, Path(tmp))


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    """One process, the whole global batch, no accumulation."""
    return {
        name: train(method, hparams, rank=0, world=1, accum=1)
        for name, method, hparams in [*CASES, LOCAL_CONTROL]
    }


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize(("name", "method", "hparams"), CASES, ids=[c[0] for c in CASES])
def test_ddp_matches_one_process_on_the_global_batch(
    ranks, reference, name, method, hparams, accum
):
    trained, expected = ranks[0][f"{name}/accum{accum}"], reference[name]
    assert trained.keys() == expected.keys()
    errors = {key: _rel_err(trained[key], expected[key]) for key in expected}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= BOUND, (
        f"{name} ({len(ranks)} ranks, accum {accum}): rel_err {errors[worst]:.3e} > {BOUND:g} "
        f"on {worst} {tuple(expected[worst].shape)} float64"
    )
    # The factors moved: a no-op optimizer would not pass vacuously.
    assert any(_rel_err(trained[k], make_model()[0].state_dict()[k]) > 1e-6 for k in expected)


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_every_rank_holds_bitwise_the_same_factors(ranks, name, accum):
    key = f"{name}/accum{accum}"
    for other in ranks[1:]:
        for param, value in ranks[0][key].items():
            assert torch.equal(value, other[key][param]), f"{key}: {param} differs across ranks"


def test_a_rank_local_step_is_not_exact(ranks, reference):
    # process_group=None steps each rank from its own rows: the silent divergence of issue 7.
    trained, expected = ranks[0]["lorsum-local/accum1"], reference["lorsum-local"]
    assert max(_rel_err(trained[k], expected[k]) for k in expected) > 1e-4
    assert not all(
        torch.equal(ranks[0]["lorsum-local/accum1"][k], ranks[1]["lorsum-local/accum1"][k])
        for k in expected
    )


def test_step_in_backward_is_refused_with_several_ranks(ranks):
    message = ranks[0]["errors"].get("step_in_backward", "")
    assert f"step_in_backward=True with world size {len(ranks)}" in message
    assert "step_in_backward=False" in message


def test_the_reducer_averages_in_one_collective_per_dtype(ranks):
    world = len(ranks)
    for result in ranks:
        info = result["reducer"]
        # (float64 6 + float32 4: 2 collectives) + (float64 6 + float32 1: 2 collectives)
        assert info["calls"] == 4
        assert info["bytes"] == 6 * 8 + 4 * 4 + 6 * 8 + 1 * 4
        mean = (world - 1) / 2
        assert torch.equal(info["same"][0], torch.full((2, 3), mean, dtype=torch.float64))
        assert torch.allclose(info["same"][1], torch.full((4,), mean))
        assert info["mixed"][1].dtype == torch.float32
        assert torch.allclose(info["mixed"][1], torch.tensor([(world + 1) / 2]))
        assert not info["holds_default_group"]


@pytest.mark.parametrize("key", ["fsdp2-lorsum", "fsdp2-precond_adamw", "fsdp2-swapped"])
def test_fsdp2_factors_are_refused_with_advice(ranks, key):
    message = ranks[0]["errors"].get(key, "")
    assert "has a DTensor factor of shape" in message, message
    assert "train with DistributedDataParallel" in message


def test_deepspeed_flattened_groups_are_refused():
    model, _ = make_model()
    optimizer = lorsum.create_optimizer(model, "lorsum")
    group = optimizer.param_groups[0]
    group["params"] = [torch.cat([p.detach().reshape(-1) for p in group["params"]])]
    with pytest.raises(NotImplementedError, match=r"holds 1 parameters instead of \[A, B\]"):
        optimizer.step()
    optimizer.capture.remove()


def test_deepspeed_zero3_partitions_are_refused():
    model, pairs = make_model()
    pairs[0].A.ds_id = 7  # what ZeRO-3 tags its partitioned parameters with
    with pytest.raises(NotImplementedError, match=r"DeepSpeed ZeRO-partitioned factor \(ds_id=7\)"):
        lorsum.create_optimizer(model, "precond_sgd")


def test_process_group_is_validated():
    model, _ = make_model()
    with pytest.raises(TypeError, match=r"Invalid process_group: 'world'"):
        lorsum.create_optimizer(model, "lorsum", process_group="world")


def test_auto_is_local_without_torch_distributed():
    model, _ = make_model()
    optimizer = lorsum.create_optimizer(model, "lorsum")
    assert optimizer.reducer is None
    assert resolve_process_group("auto") is None
    assert resolve_process_group(None) is None
    optimizer.capture.remove()
