"""``step()`` reads nothing back from the device: no ``.item()``, ``bool()``, ``float()``.

On an accelerator every such read waits for the queue to drain, and with several runs sharing
one GPU each wait also waits for the other runs' kernels: a LoRSum step with a read per
solve was several times slower than AdamW there. On the CPU the same reads are free, so these
tests forbid them by patching ``Tensor``'s conversions for the duration of a step; on a CUDA
device ``torch.cuda.set_sync_debug_mode("error")`` checks the real thing.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch import nn

import lorsum
from tests.host_reads import (
    cuda_sync_is_an_error,
    cuda_sync_is_an_error_outside_eigh,
    no_host_reads,
    step_counters,
)

# Steps that must not read device values (the first step of each is a warm-up: it may create
# state on the host, e.g. the momentum's starting basis).
SYNC_FREE = {
    "lorsum-x0": ("lorsum", {"lr": 0.1, "num_iters": 0}),
    "lorsum-x3": ("lorsum", {"lr": 0.1, "num_iters": 3}),
    "lorsum-momentum": ("lorsum", {"lr": 0.1, "num_iters": 1, "momentum": 0.9}),
    "lorsum-clipped": ("lorsum", {"lr": 0.1, "num_iters": 1, "max_grad_norm": 1.0}),
    "scaled-kfac": ("scaled_lorsum", {"lr": 0.1, "metric": "kfac"}),
    "scaled-shampoo": ("scaled_lorsum", {"lr": 0.1, "metric": "shampoo"}),
    "scaled-kfac-dense": ("scaled_lorsum", {"lr": 0.1, "metric": "kfac", "metric_form": "dense"}),
    "scaled-shampoo-dense": (
        "scaled_lorsum",
        {"lr": 0.1, "metric": "shampoo", "metric_form": "dense"},
    ),
    "precond-sgd": ("precond_sgd", {"lr": 0.1}),
    "precond-adamw": ("precond_adamw", {"lr": 0.01}),
    "lora-pro-sgd": ("lora_pro", {"lr": 0.1, "mode": "sgd"}),
    "lora-pro-adam": ("lora_pro", {"lr": 0.01, "mode": "full_adam"}),
}
# Steps that need an eigenbasis: on CUDA, torch.linalg.eigh synchronises inside itself (it
# reads its convergence flags back; torch has no eigh_ex), so these may synchronise there and
# nowhere else. On the CPU they read nothing back at all.
NEEDS_EIGH = {"scaled-kfac-dense", "scaled-shampoo-dense", "lora-pro-sgd", "lora-pro-adam"}


def _model_and_optimizer(method, hparams, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    lorsum.add_lora(model, ["0", "2"], rank=4)
    with torch.no_grad():
        for pair in lorsum.find_lora_pairs(model):
            pair.B.normal_(std=0.1)
    model.to(device)
    return model, lorsum.create_optimizer(model, method, **hparams)


def _steps_after_a_warm_up(name, device, guard):
    """Three steps of ``SYNC_FREE[name]``; the last two run inside ``guard(optimizer)``."""
    method, hparams = SYNC_FREE[name]
    model, optimizer = _model_and_optimizer(method, hparams, device)
    for step in range(3):
        x, y = torch.randn(8, 12, device=device), torch.randint(0, 3, (8,), device=device)
        nn.functional.cross_entropy(model(x), y).backward()
        with guard(optimizer) if step else contextlib.nullcontext():
            optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", sorted(SYNC_FREE))
def test_a_step_reads_nothing_back(name):
    _steps_after_a_warm_up(name, "cpu", lambda opt: no_host_reads(step_counters(opt)))


def test_the_guard_itself_catches_a_read():
    with no_host_reads(), pytest.raises(AssertionError, match="read a tensor value"):
        bool(torch.ones(()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(SYNC_FREE))
def test_a_cuda_step_does_not_synchronise(name):
    if name not in NEEDS_EIGH:
        _steps_after_a_warm_up(name, "cuda", cuda_sync_is_an_error)
        return
    calls = []
    guard = functools.partial(cuda_sync_is_an_error_outside_eigh, calls=calls)
    _steps_after_a_warm_up(name, "cuda", guard)
    assert calls, f"{name} no longer calls eigh: move it out of NEEDS_EIGH"


def _backwards_after_a_warm_up(device, guard):
    """Three in-backward steps of LoRSum with momentum; the last two backwards inside ``guard``."""
    hparams = {"lr": 0.1, "num_iters": 1, "momentum": 0.9, "step_in_backward": True}
    model, optimizer = _model_and_optimizer("lorsum", hparams, device)
    for step in range(3):
        x, y = torch.randn(8, 12, device=device), torch.randint(0, 3, (8,), device=device)
        loss = nn.functional.cross_entropy(model(x), y)
        with guard(optimizer) if step else contextlib.nullcontext():
            loss.backward()  # the pairs are stepped in here
            optimizer.step()
        optimizer.zero_grad()
    steps = [v for state in optimizer.state.values() for k, v in state.items() if k == "step"]
    assert all(int(c) == 3 for c in steps)


def test_stepping_in_backward_reads_nothing_back():
    _backwards_after_a_warm_up("cpu", lambda opt: no_host_reads(step_counters(opt)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stepping_in_backward_on_cuda_does_not_synchronise():
    _backwards_after_a_warm_up("cuda", cuda_sync_is_an_error)
