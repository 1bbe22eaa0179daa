"""Checkpoints move between devices and lose nothing: CPU ↔ CUDA, loaded with weights_only.

A run is checkpointed on one device, the checkpoint is loaded (``weights_only=True``, as the
Trainer does) onto the other, saved there again and loaded back: the state that returns must be
bit for bit the state that left, every state tensor must sit where its parameter sits, and the
resumed run must continue exactly as the uninterrupted one. The round trip itself runs on any
machine (``device_pair`` falls back to CPU ↔ CPU); the CUDA legs are marked ``cuda``.
"""

from __future__ import annotations

import io

import pytest
import torch

import lorsum
from tests.optim.test_common import IDS, OPTIMIZER_DB
from tests.utils import adapter_products, regression_batch, tiny_lora_model


def _build(method, hparams, device, *, seed=0):
    model, _ = tiny_lora_model(seed=seed)
    model = model.to(device)
    return model, lorsum.create_optimizer(model, method, dense_lr=0.01, **hparams)


def _train(model, opt, steps, device):
    x, y = (t.to(device) for t in regression_batch(seed=1))
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


def _through_bytes(obj, map_location):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location=map_location, weights_only=True)


def _state_tensors(opt):
    """Every tensor of the optimizer's state, in a fixed order, with its key."""
    return _state_tensors_of(opt.state_dict())


def _check_round_trip(method, hparams, home, away):
    # The uninterrupted run, at home.
    model, opt = _build(method, hparams, home)
    _train(model, opt, 5, home)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, opt = _build(method, hparams, home)
    _train(model, opt, 3, home)
    left = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    sent = _through_bytes(left, away)

    # Away: load into a model built there (a different init: everything must come from the file).
    away_model, away_opt = _build(method, hparams, away, seed=99)
    away_model.load_state_dict(sent["model"])
    away_opt.load_state_dict(sent["optimizer"])
    for (key, value), param in _placed(away_opt):
        if key[1] != "step":  # torch keeps step counters on the CPU by design
            assert value.device == param.device, f"{method}: state {key} stayed on {value.device}"

    # And back home, where the run continues.
    returned = {"model": away_model.state_dict(), "optimizer": away_opt.state_dict()}
    back = _through_bytes(returned, home)
    for (key, before), (key_after, after) in zip(
        _state_tensors(opt), _state_tensors_of(back["optimizer"]), strict=True
    ):
        assert key == key_after
        assert before.dtype == after.dtype, f"{method}: state {key} changed dtype"
        assert torch.equal(before.cpu(), after.cpu()), f"{method}: state {key} changed in transit"
    resumed, resumed_opt = _build(method, hparams, home, seed=98)
    resumed.load_state_dict(back["model"])
    resumed_opt.load_state_dict(back["optimizer"])
    _train(resumed, resumed_opt, 2, home)
    for a, b in zip(resumed.parameters(), uninterrupted, strict=True):
        assert torch.equal(a.detach(), b), f"{method}: the resumed run left the uninterrupted one"


def _state_tensors_of(state_dict):
    """``((index, key), tensor)`` for every tensor of a saved optimizer state, in a fixed order."""
    found = []
    for index, state in sorted(state_dict["state"].items()):
        found += [((index, key), value) for key, value in sorted(state.items())]
    return [(key, value) for key, value in found if isinstance(value, torch.Tensor)]


def _placed(opt):
    """``((index, key), tensor), parameter`` for every state tensor of the live optimizer."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        for key, value in sorted(opt.state.get(param, {}).items()):
            if isinstance(value, torch.Tensor):
                yield ((index, key), value), param


@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_a_checkpoint_survives_a_round_trip_through_another_device_map(method, hparams):
    # CPU ↔ CPU through map_location: the transport itself, on every machine.
    _check_round_trip(method, hparams, "cpu", "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize(("home", "away"), [("cuda", "cpu"), ("cpu", "cuda")])
@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_a_checkpoint_goes_between_cpu_and_cuda_and_back_bitwise(method, hparams, home, away):
    _check_round_trip(method, hparams, home, away)


@pytest.mark.cuda
@pytest.mark.parametrize(("method", "hparams"), OPTIMIZER_DB, ids=IDS)
def test_a_cpu_checkpoint_continues_on_cuda(method, hparams):
    # Different devices round differently, so a CUDA continuation of a CPU run is close, not
    # equal: float64 keeps it within 1e-10 of continuing on the CPU. Compared as functions (the
    # model's outputs and each adapter's s·BA): SVDLoRA's factors are a truncated SVD, whose
    # singular vectors CPU and CUDA may return with opposite signs.
    model, opt = _build(method, hparams, "cpu")
    _train(model, opt, 3, "cpu")
    sent = _through_bytes({"model": model.state_dict(), "optimizer": opt.state_dict()}, "cuda")
    _train(model, opt, 2, "cpu")
    on_cuda, cuda_opt = _build(method, hparams, "cuda", seed=99)
    on_cuda.load_state_dict(sent["model"])
    cuda_opt.load_state_dict(sent["optimizer"])
    _train(on_cuda, cuda_opt, 2, "cuda")
    x, _ = regression_batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(on_cuda(x.cuda()).cpu(), model(x), rtol=1e-10, atol=1e-12)
    for a, b in zip(adapter_products(on_cuda), adapter_products(model), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)


def test_integer_and_wide_state_keep_their_dtype_through_load_with_bf16_parameters():
    # torch's own load_state_dict would cast the int64 skip counter to bfloat16 (exact only up
    # to 256) and the float32 step counter stays; lorsum keeps every saved dtype.
    model, _ = tiny_lora_model(dtype=torch.bfloat16)
    opt = lorsum.create_optimizer(model, "lorsum", lr=0.1, dense_lr=0.01)
    x, y = (t.to(torch.bfloat16) for t in regression_batch(seed=1))
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    opt.step()
    saved = _through_bytes(opt.state_dict(), "cpu")
    for state in saved["state"].values():
        if "skipped_steps" in state:
            state["skipped_steps"] = torch.tensor(1000, dtype=torch.int64)
    opt.load_state_dict(saved)
    counters = [s["skipped_steps"] for s in opt.state.values() if "skipped_steps" in s]
    assert counters
    assert all(c.dtype == torch.int64 and int(c) == 1000 for c in counters)


@pytest.mark.parametrize("bad", [None, [], {"param_groups": []}])
def test_load_state_dict_names_what_it_got(bad):
    _, opt = _build("lorsum", {"lr": 0.1}, "cpu")
    with pytest.raises(TypeError, match="expects the dict of an optimizer's state_dict"):
        opt.load_state_dict(bad)
