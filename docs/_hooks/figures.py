"""MkDocs hook: the Concepts page's figures and identity check, computed by lorsum at build time.

Everything here runs lorsum's functional core on small float64 problems (a second or two on a
CPU, seeded, so every build draws the same figures):

* ``concepts/excess-vs-sweeps.png``: the relative excess residual ``‖BA − T‖/‖T − Π_r(T)‖ − 1``
  of ``lorsum.functional.lorsum`` with ``k`` sweeps, against the truncated SVD optimum
  ``Π_r(T)``, for a spectrum with a clear gap at ``r`` and one without, with the power-iteration
  rate ``(σ_{r+1}/σ_r)^{2k}`` beside each;
* ``concepts/objective-half-steps.png``: the proximal objective after every exact half-step
  (``lorsum_iterates``), which never increases;
* the ``<!-- lorsum:jacobi-identity -->`` marker in ``concepts.md``: a table of the measured
  difference between ``lorsum(num_iters=0)`` and the Riemannian / ScaledGD preconditioned LoRA
  step written literally (``riemannian_precondition``).
"""

from __future__ import annotations

import io
from typing import Any

from mkdocs.structure.files import File, Files

M, N_IN, RANK, ROWS = 120, 80, 6, 160
SWEEPS = list(range(0, 13))
MARKER = "<!-- lorsum:jacobi-identity -->"


def on_files(files: Files, config: Any) -> Files:
    excess, objective = _figures()
    files.append(File.generated(config, "concepts/excess-vs-sweeps.png", content=excess))
    files.append(File.generated(config, "concepts/objective-half-steps.png", content=objective))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, _jacobi_identity_table())
    return markdown


# --- the problems ------------------------------------------------------------------------------


def _step(spectrum: str, seed: int = 0) -> dict[str, Any]:
    """A LoRA step ``T = B0 A0 − lr·SᵀX`` whose singular values are set by ``spectrum``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    B0 = torch.randn(M, RANK, generator=gen, dtype=dtype)
    A0 = torch.randn(RANK, N_IN, generator=gen, dtype=dtype)
    X = torch.randn(ROWS, N_IN, generator=gen, dtype=dtype)
    S = torch.randn(ROWS, M, generator=gen, dtype=dtype)
    if spectrum == "decaying":  # no gap at r: singular values decay like 1/i
        U, _, Vh = torch.linalg.svd(S.T @ X, full_matrices=False)
        sigma = 1.0 / torch.arange(1, U.shape[1] + 1, dtype=dtype)
        S, X = (U * sigma).T.contiguous(), Vh  # G = SᵀX = U diag(σ) Vᵀ, still factored
    lr = float(torch.linalg.matrix_norm(B0 @ A0) / torch.linalg.matrix_norm(S.T @ X))
    return {"B0": B0, "A0": A0, "X": X, "S": S, "lr": lr}


def _excess_by_sweep(problem: dict[str, Any], damping: float) -> tuple[list[float], float]:
    import torch

    from lorsum.functional import best_rank_r, lorsum, lorsum_iterates

    B0, A0, X, S, lr = (problem[k] for k in ("B0", "A0", "X", "S", "lr"))
    terms, weights = [(B0, A0), (S.T, X)], [1.0, -lr]
    T = B0 @ A0 - lr * (S.T @ X)  # dense only here, for the oracle
    tail = float(torch.linalg.matrix_norm(T - best_rank_r(T, RANK)))
    sigma = torch.linalg.svdvals(T)
    gap = float(sigma[RANK] / sigma[RANK - 1])

    def excess(B: torch.Tensor, A: torch.Tensor) -> float:
        return max(float(torch.linalg.matrix_norm(B @ A - T)) / tail - 1.0, 1e-16)

    values = [excess(*lorsum(terms, weights, (B0, A0), num_iters=0, damping=damping))]
    iterates = lorsum_iterates(terms, weights, (B0, A0), num_iters=max(SWEEPS), damping=damping)
    for half_step, (B, A) in enumerate(iterates, start=1):
        if half_step % 2 == 0:
            values.append(excess(B, A))
    return values, gap


def _objective_by_half_step(problem: dict[str, Any], damping: float) -> list[float]:
    import torch

    from lorsum.functional import lorsum_iterates

    B0, A0, X, S, lr = (problem[k] for k in ("B0", "A0", "X", "S", "lr"))
    T = B0 @ A0 - lr * (S.T @ X)

    def objective(B: torch.Tensor, A: torch.Tensor) -> float:
        fit = torch.linalg.matrix_norm(B @ A - T) ** 2
        prox = torch.linalg.matrix_norm(B - B0) ** 2 + torch.linalg.matrix_norm(A - A0) ** 2
        return float(0.5 * fit + 0.5 * damping * prox)

    values = [objective(B0, A0)]
    terms, weights = [(B0, A0), (S.T, X)], [1.0, -lr]
    for B, A in lorsum_iterates(terms, weights, (B0, A0), num_iters=6, damping=damping):
        values.append(objective(B, A))
    return values


def _figures() -> tuple[bytes, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for color, spectrum, label in (
        ("C0", "random", "Gaussian step (gap at r)"),
        ("C1", "decaying", "1/i spectrum (no gap)"),
    ):
        values, gap = _excess_by_sweep(_step(spectrum), damping=0.0)
        ax.semilogy(SWEEPS, values, "o-", color=color, label=f"{label}: LoRSum, k sweeps")
        rate = [values[1] * gap ** (2 * (k - 1)) for k in SWEEPS[1:]]
        ax.semilogy(SWEEPS[1:], rate, ":", color=color,
                    label=f"(σ_r+1/σ_r)^2k, σ_r+1/σ_r = {gap:.2f}")  # fmt: skip
    ax.set(xlabel="sweeps k (0 = Jacobi pass = preconditioned LoRA step)",
           ylabel="‖BA − T‖ / ‖T − Π_r(T)‖ − 1", ylim=(1e-16, 10))  # fmt: skip
    ax.set_title(f"Excess residual over the truncated SVD (m={M}, n={N_IN}, r={RANK}, λ=0)",
                 fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    excess = _png(fig, plt)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for damping, style in ((1e-2, "o-"), (1.0, "s--")):
        values = _objective_by_half_step(_step("random"), damping)
        ax.plot(range(len(values)), values, style, label=f"λ = {damping:g}")
    ax.set(xlabel="half-steps (A-solve, B-solve, …)", ylabel="F(B, A)", yscale="log")
    ax.set_title("The proximal objective never increases along the exact half-steps", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    objective = _png(fig, plt)
    return excess, objective


def _png(fig: Any, plt: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _jacobi_identity_table() -> str:
    """``lorsum(num_iters=0)`` against the preconditioned step, measured now, in float64."""
    import torch

    from lorsum.functional import lorsum, riemannian_precondition

    problem = _step("random", seed=1)
    B0, A0, X, S, lr = (problem[k] for k in ("B0", "A0", "X", "S", "lr"))
    G = S.T @ X
    rows = [
        "| damping λ | ‖A⁺ − A_precond‖ / ‖A_precond‖ | ‖B⁺ − B_precond‖ / ‖B_precond‖ |",
        "|---|---|---|",
    ]
    for damping in (1e-3, 1e-1, 10.0):
        B, A = lorsum([(B0, A0), (S.T, X)], [1.0, -lr], (B0, A0), num_iters=0, damping=damping)
        # The preconditioned LoRA step on the factor gradients g_A = B0ᵀG, g_B = G A0ᵀ.
        pre_A, pre_B = riemannian_precondition(A0, B0, B0.T @ G, G @ A0.T, damping=damping)
        A_ref, B_ref = A0 - lr * pre_A, B0 - lr * pre_B
        err_A = float(torch.linalg.matrix_norm(A - A_ref) / torch.linalg.matrix_norm(A_ref))
        err_B = float(torch.linalg.matrix_norm(B - B_ref) / torch.linalg.matrix_norm(B_ref))
        rows.append(f"| {damping:g} | {err_A:.1e} | {err_B:.1e} |")
    caption = (
        f"*Measured when this site was built* (float64, m = {M}, n = {N_IN}, r = {RANK}, "
        f"N = {ROWS}; `docs/_hooks/figures.py`):"
    )
    return caption + "\n\n" + "\n".join(rows) + "\n"
