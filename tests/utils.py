"""Test data builders: seeded random factors, gradients and targets with a chosen spectrum."""

from __future__ import annotations

import torch
from torch import Tensor


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=generator(seed), dtype=dtype)


def orthonormal(rows: int, cols: int, *, seed: int) -> Tensor:
    """A ``rows × cols`` matrix with orthonormal columns (``cols <= rows``), float64."""
    return torch.linalg.qr(randn(rows, cols, seed=seed)).Q


def with_spectrum(m: int, n: int, singular_values: Tensor, *, seed: int) -> tuple[Tensor, Tensor]:
    """A pair ``(P (m, k), Q (k, n))`` whose product has exactly the given singular values."""
    k = singular_values.numel()
    U, V = orthonormal(m, k, seed=seed), orthonormal(n, k, seed=seed + 1)
    return U * singular_values.double(), V.T


def lora_problem(m: int, n: int, r: int, N: int, *, seed: int, dtype=torch.float64):
    """Factors ``(B0, A0)``, inputs ``X (N, n)`` and output-gradients ``S (N, m)``."""
    g = generator(seed)
    B0 = torch.randn(m, r, generator=g, dtype=dtype)
    A0 = torch.randn(r, n, generator=g, dtype=dtype)
    X = torch.randn(N, n, generator=g, dtype=dtype)
    S = torch.randn(N, m, generator=g, dtype=dtype)
    return B0, A0, X, S


def well_conditioned(rows: int, cols: int, *, seed: int) -> Tensor:
    """A ``rows × cols`` float64 matrix of full rank with condition number at most 2.

    Orthonormal columns (or rows) scaled by singular values spread over [1, 2]: rounding in the
    r × r normal equations then stays near ε₆₄, so exactness claims can use tight bounds.
    """
    k = min(rows, cols)
    scales = torch.linspace(1.0, 2.0, k, dtype=torch.float64)
    U, V = orthonormal(rows, k, seed=seed), orthonormal(cols, k, seed=seed + 1)
    return (U * scales) @ V.T


def tiny_lora_model(
    *, seed: int = 0, dtype: torch.dtype = torch.float64, alpha: float | None = None, rank: int = 3
):
    """A 2-layer MLP with LoRA on both linears and a trainable dense head; returns (model, pairs).

    Shapes: 8 → 12 → 6 (adapted, rank 3 by default) → 4 (the head, a dense group). ``B`` is set
    to small random values (not PEFT's zero) so that every closed form is exercised.
    """
    from torch import nn

    import lorsum

    torch.manual_seed(seed)  # nn.Linear's init; tests that need isolation pass their own seed
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4))
    model = model.to(dtype)
    pairs = lorsum.add_lora(model, ["0", "2"], rank=rank, alpha=alpha)
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            pair.B.copy_(0.3 * randn(*pair.B.shape, seed=seed + 100 + i, dtype=dtype))
    return model, pairs


def regression_batch(rows: int = 32, *, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Inputs ``(rows, 8)`` and targets ``(rows, 4)`` for :func:`tiny_lora_model`."""
    return randn(rows, 8, seed=seed, dtype=dtype), randn(rows, 4, seed=seed + 1, dtype=dtype)


def mse(model, x, y):
    """The squared-error loss every optimizer test trains on."""
    return (model(x) - y).square().mean()


def lora_layers(model):
    """The model's ``LoRALinear`` layers, in ``modules()`` order."""
    import lorsum

    return [m for m in model.modules() if isinstance(m, lorsum.LoRALinear)]


def full_weight_gradients(model, x, y):
    """``∂L/∂W`` of every adapted layer, by autograd on a copy whose base weights are trainable.

    A copy, so that no hook of a capture on ``model`` sees this extra backward.
    """
    import copy

    twin = copy.deepcopy(model)
    layers = lora_layers(twin)
    for layer in layers:
        layer.base.weight.requires_grad_(True)
    return torch.autograd.grad(mse(twin, x, y), [layer.base.weight for layer in layers])


def adapter_products(model):
    """``s · B @ A`` of every adapted layer (detached)."""
    with torch.no_grad():
        return [m.scaling * m.lora_B.weight @ m.lora_A.weight for m in lora_layers(model)]


def quick_suite_record(module: str, out_dir, file_name: str) -> dict:
    """Run ``python -m benchmarks.<module> --quick --out out_dir`` and return its JSON record.

    A subprocess, as a user runs it (fresh interpreter, the module's own ``main``); a non-zero
    exit fails the test with the end of its stderr.
    """
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(out_dir)],
        cwd=repo_root, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((Path(out_dir) / file_name).read_text())
