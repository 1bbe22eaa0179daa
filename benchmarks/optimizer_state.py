"""Optimizer state and step time of every method on one transformer block of SmolLM2-135M's shapes.

LoRA-Pro's AdamW keeps full-size ``m × n`` moments per adapted layer; LoRSum keeps only low-rank
factors. This suite measures it rather than stating it: it builds the seven linear layers of one
SmolLM2-135M block (hidden 576, intermediate 1536, grouped k/v 192) with rank-16 LoRA on all of
them, takes a few steps of each method on random data (N tokens, float32, CPU), and records the
bytes held in ``optimizer.state`` and the median time of ``optimizer.step()``. The whole model has
30 such blocks; the per-model figure is that multiple, labelled as such.

Run from the repository root::

    python -m benchmarks.optimizer_state [--force] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorsum
from benchmarks import _results

SUITE = "optimizer_state"
DEFAULT_OUT = _results.REPO_ROOT / "benchmarks" / "results" / SUITE
# (name, in_features, out_features) of one SmolLM2-135M decoder block (config.json of the model).
BLOCK = [
    ("q_proj", 576, 576),
    ("k_proj", 576, 192),
    ("v_proj", 576, 192),
    ("o_proj", 576, 576),
    ("gate_proj", 576, 1536),
    ("up_proj", 576, 1536),
    ("down_proj", 1536, 576),
]
METHODS = {
    "lorsum": {"lr": 0.1, "num_iters": 1},
    "lorsum_momentum": {"lr": 0.1, "num_iters": 1, "momentum": 0.9},
    "scaled_lorsum": {"lr": 0.1},
    "svdlora": {"lr": 0.1},
    "precond_adamw": {"lr": 1e-3},
    "lora_pro": {"lr": 2e-5},
    "adamw": {"lr": 1e-3},
}


class _Block(nn.Module):
    """The seven projections, each applied to its own input (shapes are what matter here)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({name: nn.Linear(i, o, bias=False) for name, i, o in BLOCK})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(layer(inputs[name]).square().mean() for name, layer in self.layers.items())


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state``."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def measure(method: str, hparams: dict[str, Any], tokens: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    block = _Block()
    pairs = lorsum.add_lora(block, [f"layers.{name}" for name, _, _ in BLOCK], rank=16, alpha=32)
    method_name = "lorsum" if method == "lorsum_momentum" else method
    optimizer = lorsum.create_optimizer(block, method_name, **hparams)
    inputs = {name: torch.randn(tokens, i) for name, i, _ in BLOCK}
    times = []
    for _ in range(steps):
        optimizer.zero_grad()
        block(inputs).backward()
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    if getattr(optimizer, "capture", None) is not None:
        optimizer.capture.remove()
    adapter_params = sum(p.A.numel() + p.B.numel() for p in pairs)
    return {
        "method": method,
        "hparams": hparams,
        "state_bytes_per_block": state_bytes(optimizer),
        "adapter_param_bytes_per_block": 4 * adapter_params,
        "base_weight_bytes_per_block": 4 * sum(i * o for _, i, o in BLOCK),
        "step_time_s": _results.time_stats(times[1:]),  # the first step allocates the state
    }


def run(config: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    results = [
        measure(method, METHODS[method], config["tokens"], config["steps"])
        for method in config["methods"]
    ]
    return _results.make_record(
        suite=SUITE,
        part="state",
        config=config,
        device="cpu",
        dtype="float32",
        seeds=(0,),
        wall_time_s=time.perf_counter() - start,
        results=results,
        summary={
            r["method"]: {
                "state_MiB_per_block": r["state_bytes_per_block"] / 2**20,
                "state_MiB_whole_model": config["blocks"] * r["state_bytes_per_block"] / 2**20,
                "median_step_ms": 1e3 * r["step_time_s"]["median_s"],
            }
            for r in results
        },
        notes={
            "block": "q,k,v,o,gate,up,down of SmolLM2-135M (hidden 576, intermediate 1536)",
            "state_bytes_per_block": "bytes of every tensor in optimizer.state after the steps",
            "whole_model": f"{config['blocks']} blocks x the per-block figure (computed, not run)",
            "step_time_s": "optimizer.step() only, after backward; steps after the first",
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rerun even if results exist")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result directory")
    parser.add_argument("--quick", action="store_true", help="2 methods, 64 tokens (for tests)")
    args = parser.parse_args(argv)
    config = {
        "methods": ["lorsum", "lora_pro"] if args.quick else list(METHODS),
        "tokens": 64 if args.quick else 512,
        "steps": 3 if args.quick else 6,
        "rank": 16,
        "blocks": 30,
        "threads": torch.get_num_threads(),
    }
    path = args.out / "state.json"
    record = None if args.force else _results.load_current(path, config)
    if record is None:
        record = run(config)
        _results.write_json_atomic(path, record)
    rows = [
        [
            method,
            f"{s['state_MiB_per_block']:.2f}",
            f"{s['state_MiB_whole_model']:.0f}",
            f"{s['median_step_ms']:.1f}",
        ]
        for method, s in record["summary"].items()
    ]
    headers = ["method", "state MiB / block", "state MiB / 30 blocks", "step ms / block"]
    print(_results.markdown_table(headers, rows))
    print(f"step times: median of {config['steps'] - 1} steps after the first; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
