"""FactoredSum: products with T equal the dense oracle, casting, and shape validation."""

from __future__ import annotations

import pytest
import torch

from lorsum.functional import FactoredSum
from tests import reference as ref
from tests.utils import randn


def _sum():
    terms = [
        (randn(7, 3, seed=1), randn(3, 5, seed=2)),
        randn(7, 5, seed=3),
        (randn(7, 1, seed=4), randn(1, 5, seed=5)),
    ]
    weights = [0.5, -2.0, torch.tensor(3.0, dtype=torch.float64)]
    return terms, weights


def test_products_equal_the_dense_matrix():
    terms, weights = _sum()
    T = FactoredSum.from_terms(terms, weights, (7, 5))
    dense = ref.dense_target(terms, weights)
    Z, Y = randn(5, 4, seed=6), randn(7, 2, seed=7)
    assert ref.rel_err(T.matmul(Z), dense @ Z) <= 1e-14
    assert ref.rel_err(T.rmatmul(Y), Y.T @ dense) <= 1e-14
    assert ref.rel_err(T.to_dense(), dense) <= 1e-14


def test_cast_changes_every_factor_and_keeps_weights():
    terms, weights = _sum()
    T = FactoredSum.from_terms(terms, weights, (7, 5), dtype=torch.float32)
    assert all(P.dtype == Q.dtype == torch.float32 for _, P, Q in T.pairs)
    T64 = T.to(torch.float64)
    assert T64.dense[0][1].dtype == torch.float64
    assert [w for w, *_ in T64.pairs] == [w for w, *_ in T.pairs]


def test_an_empty_sum_cannot_be_made_dense():
    with pytest.raises(ValueError, match="an empty sum has no dtype"):
        FactoredSum.from_terms([], [], (3, 4)).to_dense()


def test_weights_must_be_a_sequence_of_real_scalars():
    terms, _ = _sum()
    with pytest.raises(TypeError, match="weights must be a sequence of scalars"):
        FactoredSum.from_terms(terms, torch.ones(3), (7, 5))
    with pytest.raises(TypeError, match=r"weights\[0\] must be a real number or a 0-d floating"):
        FactoredSum.from_terms(terms, [torch.ones(2), 1.0, 1.0], (7, 5))
    with pytest.raises(TypeError, match=r"weights\[1\] must be a real number, got True"):
        FactoredSum.from_terms(terms, [1.0, True, 1.0], (7, 5))


def test_sparse_terms_are_refused():
    with pytest.raises(NotImplementedError, match=r"layout torch\.sparse_coo"):
        FactoredSum.from_terms([randn(3, 4, seed=0).to_sparse()], [1.0], (3, 4))


def test_terms_on_another_device_are_refused():
    with pytest.raises(ValueError, match=r"terms\[0\] is on cpu, but the factors are on meta"):
        FactoredSum.from_terms([randn(3, 4, seed=0)], [1.0], (3, 4), device=torch.device("meta"))
