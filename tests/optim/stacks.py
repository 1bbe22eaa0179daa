"""Shared pieces of the stacked-step tests: a model whose adapters form one stack of three and a
stack of one, a spy that records the size of every stack an optimizer steps, and an overflow
injected into one pair's captured gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorsum


def three_plus_one(width: int, out: int, *, alpha: float | None = None, seed: int = 0) -> nn.Module:
    """Three ``width → width`` adapted layers (one stack) and one ``width → out`` (its own), in
    float64, rank 3, with ``B`` drawn non-zero as after the first steps of training."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out),
    ).double()  # fmt: skip
    scale = {} if alpha is None else {"alpha": alpha}
    lorsum.add_lora(model, ["0", "2", "4", "6"], rank=3, **scale)
    with torch.no_grad():
        for pair in lorsum.find_lora_pairs(model):
            pair.B.normal_(std=0.3)
    return model


def record_stack_sizes(monkeypatch: pytest.MonkeyPatch, optimizer: type) -> list[int]:
    """The size of every stack ``optimizer`` steps from now on, in order (through its
    ``_step_stack``, which each stacking optimizer has)."""
    sizes: list[int] = []
    original = optimizer._step_stack

    def spy(self, members):
        sizes.append(len(members))
        return original(self, members)

    monkeypatch.setattr(optimizer, "_step_stack", spy)
    return sizes


def poison_captured(optimizer: torch.optim.Optimizer, index: int) -> None:
    """Make pair ``index``'s captured gradient non-finite, as an overflow would: its rows or
    dense form, and its output-gradient statistics where the capture keeps them (K-FAC)."""
    captured = optimizer.capture.peek(optimizer.capture.pairs[index].B)
    if captured.dense is not None:
        captured.dense[0, 0] = float("inf")
    else:
        S, X = captured.rows[0]
        captured.rows[0] = (S * float("inf"), X)
    for name in ("output_grad_sq_sum", "output_grad_gram"):
        statistic = getattr(captured, name)
        if statistic is not None:
            statistic.view(-1)[0] = float("inf")


def train(
    optimizer: str,
    foreach: bool,
    hparams: dict,
    *,
    width: int,
    steps: int = 4,
    micro_batches: int = 1,
    poison: int | None = None,
    before_last=None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``steps`` steps of ``optimizer`` (a :func:`lorsum.create_optimizer` name) on
    :func:`three_plus_one` ``(width, 6)``, each on ``micro_batches`` float64 batches of 8 rows.
    Before the last step, pair ``poison``'s captured gradient is made non-finite and
    ``before_last()`` is called."""
    model = three_plus_one(width, 6)
    opt = lorsum.create_optimizer(model, optimizer, foreach=foreach, **hparams)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for _ in range(micro_batches):
            x = torch.randn(8, width, generator=g, dtype=torch.float64)
            y = torch.randn(8, 6, generator=g, dtype=torch.float64)
            (model(x) - y).square().mean().backward()
        if step == steps - 1:
            if poison is not None:
                poison_captured(opt, poison)
            if before_last is not None:
                before_last()
        opt.step()
        opt.zero_grad()
    return model, opt


def pair_values(model: nn.Module, opt: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """Per pair: ``A``, ``B`` and every tensor the optimizer keeps for it (its counters left
    out), in a fixed order."""
    out = []
    for pair in lorsum.find_lora_pairs(model):
        values = [pair.A.detach().clone(), pair.B.detach().clone()]
        for p in (pair.A, pair.B):
            state = opt.state[p]
            values += [
                state[k].clone()
                for k in sorted(state)
                if k not in ("step", "skipped_steps") and isinstance(state[k], torch.Tensor)
            ]
        out.append(values)
    return out


def assert_pairs_close(ours, theirs, *, rtol: float, atol: float) -> None:
    """:func:`pair_values` of two runs agree, pair by pair, naming the pair that does not."""
    assert [len(v) for v in ours] == [len(v) for v in theirs]
    for pair, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
        for a, b in zip(mine, other, strict=True):
            torch.testing.assert_close(
                a, b, rtol=rtol, atol=atol, msg=lambda m, pair=pair: f"pair {pair}: {m}"
            )
