"""The pure math of lorsum: tensors in, tensors out, no state. Imports torch only."""

from lorsum.functional.als import lorsum, lorsum_iterates
from lorsum.functional.feature import OutputStatistics, energy_rank, feature_basis
from lorsum.functional.linalg import default_compute_dtype, prox_solve
from lorsum.functional.lora_pro import (
    equivalent_gradient,
    lora_pro_adam,
    lora_pro_gradients,
    lora_pro_x,
    solve_symmetric_sylvester,
)
from lorsum.functional.lu import dense_ldu_product, ldu_matmul, pivoted_ldu
from lorsum.functional.metrics import (
    bias_corrected,
    kfac_statistics,
    metric_power,
    precondition_pair,
    running_average_,
    shampoo_statistics,
)
from lorsum.functional.preconditioning import riemannian_precondition
from lorsum.functional.sds import sds_activate, sds_refresh, sds_refresh_due
from lorsum.functional.svd import (
    balanced_factors,
    best_rank_r,
    gram_truncated_svd,
    randomized_svd,
    truncated_svd,
)
from lorsum.functional.terms import FactoredSum, Term
from lorsum.functional.trp import Truncation, energy_truncation, warm_energy_truncation

__all__ = [
    "FactoredSum",
    "OutputStatistics",
    "Term",
    "Truncation",
    "balanced_factors",
    "best_rank_r",
    "bias_corrected",
    "default_compute_dtype",
    "dense_ldu_product",
    "energy_rank",
    "energy_truncation",
    "equivalent_gradient",
    "feature_basis",
    "gram_truncated_svd",
    "kfac_statistics",
    "ldu_matmul",
    "lora_pro_adam",
    "lora_pro_gradients",
    "lora_pro_x",
    "lorsum",
    "lorsum_iterates",
    "metric_power",
    "pivoted_ldu",
    "precondition_pair",
    "prox_solve",
    "randomized_svd",
    "riemannian_precondition",
    "running_average_",
    "sds_activate",
    "sds_refresh",
    "sds_refresh_due",
    "shampoo_statistics",
    "solve_symmetric_sylvester",
    "truncated_svd",
    "warm_energy_truncation",
]
