"""gda.retrieval_metrics: AP over a full ranking, its random expectation, mAP(L) with standard error."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from gda.retrieval_metrics import average_precision, map_at, random_average_precision


def test_average_precision_by_hand() -> None:
    # positives at positions 1, 3, 5: precisions 1/1, 2/3, 3/5
    assert average_precision(np.array([10, 11, 12, 13, 14]), np.array([14, 10, 12])) == pytest.approx(
        (1 + 2 / 3 + 3 / 5) / 3
    )
    assert average_precision(np.array([7, 8, 9]), np.array([7])) == 1.0
    assert average_precision(np.array([7, 8, 9]), np.array([9])) == pytest.approx(1 / 3)


def test_absent_positive_counts_as_never_retrieved() -> None:
    assert average_precision(np.array([1, 2, 3]), np.array([1, 99])) == pytest.approx(0.5)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="positive"):
        average_precision(np.array([1, 2]), np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="repeat"):
        average_precision(np.array([1, 2, 1]), np.array([1]))


def test_average_precision_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(5, 200))
        scores = rng.permutation(n).astype(float)  # distinct scores: no tie handling differences
        relevant = rng.random(n) < 0.2
        relevant[rng.integers(n)] = True
        ranked = np.argsort(-scores)
        expected = metrics.average_precision_score(relevant, scores)
        assert average_precision(ranked, np.flatnonzero(relevant)) == pytest.approx(expected)


@pytest.mark.parametrize(("n_items", "n_positives"), [(1, 1), (5, 1), (7, 3), (8, 8), (9, 4)])
def test_random_average_precision_is_the_exact_mean_over_positions(n_items: int, n_positives: int) -> None:
    # Every placement of the positives is equally likely under a random ranking: enumerate them all.
    ranked = np.arange(n_items)
    values = [
        average_precision(ranked, np.array(chosen)) for chosen in itertools.combinations(range(n_items), n_positives)
    ]
    assert random_average_precision(n_items, n_positives) == pytest.approx(np.mean(values))


def test_map_at_uses_the_teacher_top_l_and_the_full_method_ranking() -> None:
    teacher = {1: np.array([5, 6, 7, 8]), 2: np.array([9, 10, 11, 12])}
    method = {1: np.array([6, 8, 7, 5]), 2: np.array([9, 10, 12, 11])}
    ap1 = (1 / 1 + 2 / 4) / 2  # positives {5, 6} at method positions 4 and 1
    ap2 = 1.0  # positives {9, 10} first
    result = map_at(teacher, method, L=2)
    assert result.mean == pytest.approx((ap1 + ap2) / 2)
    assert result.standard_error == pytest.approx(np.std([ap1, ap2], ddof=1) / math.sqrt(2))
    assert result.n_queries == 2
    mean, error, n = map_at(teacher, teacher, L=3)
    assert (mean, error, n) == (1.0, 0.0, 2)


def test_map_at_single_query_has_no_standard_error() -> None:
    assert math.isnan(map_at({1: np.array([1, 2])}, {1: np.array([2, 1])}, L=1).standard_error)


def test_map_at_refuses_a_different_set() -> None:
    with pytest.raises(ValueError, match="another set"):
        map_at({1: np.array([1, 2, 3])}, {1: np.array([1, 2])}, L=1)
    with pytest.raises(ValueError, match="no ranking for query 1"):
        map_at({1: np.array([1, 2, 3])}, {2: np.array([1, 2, 3])}, L=1)
