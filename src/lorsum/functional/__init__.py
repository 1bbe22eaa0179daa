"""The pure math of lorsum: tensors in, tensors out, no state. Imports torch only."""

from lorsum.functional.als import lorsum, lorsum_iterates
from lorsum.functional.linalg import default_compute_dtype, prox_solve
from lorsum.functional.metrics import (
    bias_corrected,
    kfac_statistics,
    metric_power,
    precondition_pair,
    running_average_,
    shampoo_statistics,
)
from lorsum.functional.svd import balanced_factors, best_rank_r, randomized_svd, truncated_svd
from lorsum.functional.terms import FactoredSum, Term

__all__ = [
    "FactoredSum",
    "Term",
    "balanced_factors",
    "best_rank_r",
    "bias_corrected",
    "default_compute_dtype",
    "kfac_statistics",
    "lorsum",
    "lorsum_iterates",
    "metric_power",
    "precondition_pair",
    "prox_solve",
    "randomized_svd",
    "running_average_",
    "shampoo_statistics",
    "truncated_svd",
]
