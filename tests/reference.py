"""Dense float64 oracles for the functional core. Never imported by ``src/``.

Everything here forms the ``m × n`` matrices that lorsum must never form, and states the math
literally (explicit solves on dense matrices, full SVDs), so a disagreement points at lorsum.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rel_err(x: Tensor, ref: Tensor) -> float:
    """``‖x − ref‖_F / max(‖ref‖_F, tiny)`` computed in float64."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny))


def dense_target(terms, weights) -> Tensor:
    """``T = Σ w_i P_i Q_i`` (or dense terms), formed in float64."""
    total = None
    for term, w in zip(terms, weights, strict=True):
        part = term.double() if isinstance(term, Tensor) else term[0].double() @ term[1].double()
        part = float(w) * part
        total = part if total is None else total + part
    return total


def as_matrix(metric: Tensor | None, size: int) -> Tensor:
    """A diagonal (vector) or dense metric as a dense float64 matrix; identity for ``None``."""
    if metric is None:
        return torch.eye(size, dtype=torch.float64)
    metric = metric.double()
    return torch.diag(metric) if metric.ndim == 1 else metric


def sqrtm(M: Tensor) -> Tensor:
    """Symmetric square root of an SPD matrix (float64)."""
    eigvals, V = torch.linalg.eigh(M.double())
    return (V * eigvals.clamp_min(0).sqrt()) @ V.T


def objective(B, A, T, init, damping, metric_out=None, metric_in=None) -> float:
    """``½‖M_out^½(BA − T)M_in^½‖² + (λ/2)(‖M_out^½(B − B0)‖² + ‖(A − A0)M_in^½‖²)``."""
    B, A, T = B.double(), A.double(), T.double()
    B0, A0 = init[0].double(), init[1].double()
    Mo, Mi = as_matrix(metric_out, B.shape[0]), as_matrix(metric_in, A.shape[1])
    R = B @ A - T
    fit = 0.5 * torch.trace(Mo @ R @ Mi @ R.T)
    prox = torch.trace((B - B0).T @ Mo @ (B - B0)) + torch.trace((A - A0) @ Mi @ (A - A0).T)
    return float(fit + 0.5 * damping * prox)


def best_rank(M: Tensor, r: int) -> Tensor:
    """Eckart–Young: the best rank-r approximation by a full float64 SVD."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def weighted_best_rank(T: Tensor, r: int, metric_out: Tensor, metric_in: Tensor) -> Tensor:
    """Rank-r minimiser of ``‖M_out^½(X − T)M_in^½‖``: ``M_out^-½ Π_r(M_out^½TM_in^½) M_in^-½``."""
    Ro, Ri = sqrtm(as_matrix(metric_out, T.shape[0])), sqrtm(as_matrix(metric_in, T.shape[1]))
    core = best_rank(Ro @ T.double() @ Ri, r)
    return torch.linalg.solve(Ri, torch.linalg.solve(Ro, core).T).T


def riemannian_step(B0, A0, G, lr, damping):
    """The Jacobi (num_iters = 0) closed form: Riemannian / ScaledGD-preconditioned LoRA SGD."""
    B0, A0, G = B0.double(), A0.double(), G.double()
    r = A0.shape[0]
    eye = torch.eye(r, dtype=torch.float64)
    A1 = A0 - lr * torch.linalg.solve(B0.T @ B0 + damping * eye, B0.T @ G)
    B1 = B0 - lr * torch.linalg.solve(A0 @ A0.T + damping * eye, (G @ A0.T).T).T
    return B1, A1


def gauss_seidel_sweep(B0, A0, G, lr, damping):
    """One alternating sweep in closed form: A1 as Jacobi, ``B1 = (λB0 + T A1ᵀ)(A1A1ᵀ + λI)⁻¹``."""
    B0, A0, G = B0.double(), A0.double(), G.double()
    r = A0.shape[0]
    eye = torch.eye(r, dtype=torch.float64)
    T = B0 @ A0 - lr * G
    A1 = A0 - lr * torch.linalg.solve(B0.T @ B0 + damping * eye, B0.T @ G)
    B1 = torch.linalg.solve(A1 @ A1.T + damping * eye, (damping * B0 + T @ A1.T).T).T
    return B1, A1
