"""Bad input at the public boundaries: each error is a ``ValueError`` or ``TypeError`` that names
the offending value and what is allowed, one case per error. (Errors of the optimizers, the
capture, the functional core's main entry points and the command line are tested beside their
features; this file holds the ones a coverage audit of the ``raise`` statements found untested.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorsum
from lorsum.adapters import SDSLoRALinear
from lorsum.adapters.sds import SDSLoRASchedule, add_sds_lora
from lorsum.compression import (
    LowRankLinear,
    TrainedRankPruning,
    collect_output_statistics,
    lord_factors,
)
from lorsum.distributed import resolve_process_group
from lorsum.functional import lorsum as lorsum_fit
from lorsum.functional import riemannian_precondition
from lorsum.functional.feature import OutputStatistics, energy_rank, feature_basis
from lorsum.functional.sds import sds_activate
from lorsum.lora import LoRAPair, pair_param_groups
from lorsum.optim.lora_plus import lora_plus_param_groups
from tests.utils import randn


def _mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _pair(**changes):
    A, B = nn.Parameter(randn(2, 4, seed=0)), nn.Parameter(randn(5, 2, seed=1))
    return LoRAPair(**{"A": A, "B": B, "scaling": 1.0, "name": "p", **changes})


def _factors():
    return randn(5, 2, seed=0), randn(2, 4, seed=1)  # B0 (m, r), A0 (r, n)


CASES = [
    # --- models and adapters
    ("add_lora: a target that is not a Linear",
     lambda: lorsum.add_lora(_mlp(), ["1"], rank=2), ValueError,
     r"'1' is a ReLU, not an nn\.Linear"),
    ("add_lora: a predicate that matches nothing",
     lambda: lorsum.add_lora(_mlp(), lambda name, m: False, rank=2), ValueError,
     "no nn.Linear matched the target"),
    ("LoRALinear: not a Linear",
     lambda: lorsum.LoRALinear(nn.ReLU(), 2), TypeError, "adapts nn.Linear layers, got ReLU"),
    ("LoRALinear: rank 0", lambda: lorsum.LoRALinear(nn.Linear(4, 5), 0), ValueError,
     r"Invalid rank: 0 \(must be an int >= 1\)"),
    ("LoRALinear: dropout 1", lambda: lorsum.LoRALinear(nn.Linear(4, 5), 2, dropout=1.0),
     ValueError, r"Invalid dropout: 1\.0"),
    ("LoRALinear: alpha 0", lambda: lorsum.LoRALinear(nn.Linear(4, 5), 2, alpha=0.0),
     ValueError, r"Invalid alpha: 0\.0 \(must be > 0\)"),
    ("lora_pairs: a model without adapters", lambda: lorsum.lora_pairs(_mlp()), ValueError,
     "the model has no LoRALinear layers"),
    ("SDSLoRALinear: alpha 0", lambda: SDSLoRALinear(nn.Linear(4, 5), 2, alpha=0.0), ValueError,
     r"Invalid alpha: 0\.0"),
    ("SDSLoRALinear: dropout -0.1", lambda: SDSLoRALinear(nn.Linear(4, 5), 2, dropout=-0.1),
     ValueError, r"Invalid dropout: -0\.1"),
    # --- pairs and groups
    ("LoRAPair: a frozen tensor", lambda: _pair(A=randn(2, 4, seed=0)), TypeError,
     "A must be a trainable parameter"),
    ("LoRAPair: a 1-d factor", lambda: _pair(A=nn.Parameter(torch.zeros(4))), ValueError,
     r"A must be 2-d, got shape \(4,\)"),
    ("LoRAPair: ranks disagree", lambda: _pair(B=nn.Parameter(torch.zeros(5, 3))), ValueError,
     "disagree on the rank"),
    ("LoRAPair: a non-number scaling", lambda: _pair(scaling="1"), ValueError,
     "invalid scaling '1'"),
    ("LoRAPair: a negative scaling", lambda: _pair(scaling=-1.0), ValueError,
     r"scaling must be > 0, got -1\.0"),
    ("LoRAPair: three modules", lambda: _pair(modules=(nn.Identity(),) * 3), ValueError,
     r"modules must be \(down, up\)"),
    ("pair_param_groups: no pairs", lambda: pair_param_groups([]), ValueError,
     "no LoRA pairs given"),
    ("pair_param_groups: not a pair", lambda: pair_param_groups(["A"]), TypeError,
     "expected LoRAPair values, got str"),
    ("lora_plus_param_groups: no pairs", lambda: lora_plus_param_groups([], lr=1e-3), ValueError,
     "no LoRA pairs given"),
    # --- optimizers
    ("LoRSum: a capture that is not one",
     lambda: lorsum.LoRSum(pair_param_groups([_pair()]), capture=object()), TypeError,
     "capture must be a GradientCapture, got object"),
    ("an optimizer given a tensor", lambda: lorsum.PrecondLoRA(torch.zeros(3)), TypeError,
     "params must be an iterable of param groups"),
    ("process_group: a string", lambda: resolve_process_group("world"), TypeError,
     "Invalid process_group: 'world'"),
    ("process_group: a number", lambda: resolve_process_group(3), TypeError,
     "Invalid process_group: 3"),
    # --- functional core
    ("lorsum: an empty factor",
     lambda: lorsum_fit([torch.zeros(5, 4)], [1.0], (torch.zeros(5, 0), torch.zeros(0, 4))),
     ValueError, r"empty factors: B0 \(5, 0\)"),
    ("lorsum: factors on two devices",
     lambda: lorsum_fit([torch.zeros(5, 4)], [1.0], (torch.zeros(5, 2), torch.zeros(2, 4,
                                                                                  device="meta"))),
     ValueError, "B0 is on cpu but A0 is on meta"),
    ("lorsum: a damping that is not a number",
     lambda: lorsum_fit([torch.zeros(5, 4)], [1.0], _factors(), damping="1e-3"), TypeError,
     "damping must be a real number, got '1e-3'"),
    ("lorsum: an integer metric",
     lambda: lorsum_fit([torch.zeros(5, 4)], [1.0], _factors(),
                        metric_out=torch.ones(5, dtype=torch.int64)),
     TypeError, "metric_out must have a real floating dtype, got torch.int64"),
    ("lorsum: a metric on another device",
     lambda: lorsum_fit([torch.zeros(5, 4)], [1.0], _factors(),
                        metric_in=torch.ones(4, device="meta")),
     ValueError, "metric_in is on meta, but the factors are on cpu"),
    ("lorsum: a local term index that is not an int",
     lambda: lorsum_fit([torch.zeros(5, 4)], [1.0], _factors(), local_terms=["0"],
                        reduce=lambda ts: ts),
     TypeError, "local_terms must hold term indices"),
    ("lorsum: a term that is not a tensor",
     lambda: lorsum_fit([("P", "Q")], [1.0], _factors()), TypeError,
     "must be a torch.Tensor, got str"),
    ("riemannian_precondition: gradients of other shapes",
     lambda: riemannian_precondition(randn(2, 4, seed=0), randn(5, 2, seed=1),
                                     torch.zeros(2, 3), torch.zeros(5, 2), damping=0.0),
     ValueError, "do not match the factors"),
    ("riemannian_precondition: negative damping",
     lambda: riemannian_precondition(randn(2, 4, seed=0), randn(5, 2, seed=1),
                                     torch.zeros(2, 4), torch.zeros(5, 2), damping=-1.0),
     ValueError, r"Invalid damping: -1\.0 \(must be >= 0\)"),
    ("sds_activate: B of another rank",
     lambda: sds_activate(torch.zeros(2, 4), torch.zeros(5, 3), 1.0), ValueError,
     r"B must be \(m, 2\) to match A \(2, 4\)"),
    ("sds_activate: scaling 0", lambda: sds_activate(torch.zeros(2, 4), torch.zeros(5, 2), 0.0),
     ValueError, "scaling must be positive, got 0.0"),
    ("OutputStatistics: a non-square moment",
     lambda: OutputStatistics(second_moment=torch.zeros(3, 4), mean=torch.zeros(3), count=1),
     ValueError, r"second_moment must be square, got shape \(3, 4\)"),
    ("OutputStatistics.from_outputs: an empty tensor",
     lambda: OutputStatistics.from_outputs(torch.zeros(0, 3)), ValueError,
     "outputs must be a non-empty tensor"),
    ("OutputStatistics.covariance: an offset with centring",
     lambda: OutputStatistics.from_outputs(torch.ones(4, 3)).covariance(
         center=True, offset=torch.zeros(3)),
     ValueError, "offset is only used when center=False"),
    ("OutputStatistics.covariance: an offset of the wrong size",
     lambda: OutputStatistics.from_outputs(torch.ones(4, 3)).covariance(
         center=False, offset=torch.zeros(2)),
     ValueError, r"offset has shape \(2,\), expected \(3,\)"),
    ("feature_basis: a non-square covariance", lambda: feature_basis(torch.zeros(3, 4), 1),
     ValueError, r"covariance must be square, got shape \(3, 4\)"),
    ("energy_rank: an infinite spectrum",
     lambda: energy_rank(torch.tensor([1.0, float("inf")]), 0.9), ValueError,
     "spectrum must be finite"),
    ("SDSLoRASchedule: zero total steps",
     lambda: SDSLoRASchedule(add_sds_lora(_mlp(), ["0"], rank=2), None, total_steps=0),
     ValueError, "need total_steps ≥ 1, warmup_steps ≥ 0 and refresh_phases ≥ 1, got 0"),
    # --- compression
    ("LowRankLinear: zero inputs", lambda: LowRankLinear(0, 3, 1), ValueError,
     r"Invalid in_features: 0 \(must be an int >= 1\)"),
    ("LowRankLinear.from_factors: a bias of the wrong size",
     lambda: LowRankLinear.from_factors(torch.zeros(2, 4), torch.zeros(5, 2), torch.zeros(3)),
     ValueError, r"bias has shape \(3,\), expected \(5,\)"),
    ("lord_factors: an integer compute dtype",
     lambda: lord_factors(torch.zeros(5, 4), 2, compute_dtype=torch.int32), TypeError,
     "compute_dtype must be a floating torch.dtype, got torch.int32"),
    ("lord_factors: centring without the feature method",
     lambda: lord_factors(torch.zeros(5, 4), 2, center=True), ValueError,
     "center=True needs method='feature'"),
    ("collect_output_statistics: calibration of the wrong kind",
     lambda: collect_output_statistics(_mlp(), ["0"], 3), TypeError,
     "calibration must be an iterable of batches or a callable, got int"),
    ("TrainedRankPruning: negative nuclear weight",
     lambda: TrainedRankPruning(_mlp(), ["0"], nuclear_weight=-1.0), ValueError,
     r"nuclear_weight must be >= 0, got -1\.0"),
    ("TrainedRankPruning: zero sweeps", lambda: TrainedRankPruning(_mlp(), ["0"], sweeps=0),
     ValueError, "sweeps must be >= 1, got 0"),
    ("TrainedRankPruning: no target", lambda: TrainedRankPruning(_mlp(), []), ValueError,
     "no target layer given"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
