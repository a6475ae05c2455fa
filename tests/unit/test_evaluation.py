"""gda.evaluation: rankings by cosine, restriction to the teacher's set, and the mAP(L) table."""

from __future__ import annotations

import numpy as np
import pytest

from gda.evaluation import by_level, cosine_rankings, levels_for, markdown_table, random_rankings, rank_table, restrict


def test_cosine_rankings_order_by_inner_product() -> None:
    train_ids = np.array([10, 11, 12])
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    queries = np.array([[0.0, 1.0], [1.0, 0.1]])
    rankings = cosine_rankings(queries, train, {5: 0, 6: 1}, train_ids)
    assert rankings[5].tolist() == [11, 12, 10] and rankings[6].tolist() == [10, 12, 11]


def test_restrict_keeps_the_order_within_the_teacher_set() -> None:
    teacher = {1: np.array([12, 10])}
    assert restrict({1: np.array([11, 10, 13, 12])}, teacher)[1].tolist() == [10, 12]


def test_rank_table_against_hand_computed_average_precision() -> None:
    teacher = {1: np.array([1, 2, 3, 4]), 2: np.array([4, 3, 2, 1])}
    method = {1: np.array([2, 4, 1, 3]), 2: np.array([4, 1, 3, 2])}
    table = rank_table(teacher, {"distilled": method}, [2])
    # query 1: positives {1, 2} at positions 1 and 3 -> (1/1 + 2/3) / 2; query 2: {4, 3} at 1 and 3 -> the same.
    expected = (1 + 2 / 3) / 2
    assert table.row(0, named=True) == {
        "method": "distilled",
        "L": 2,
        "map": pytest.approx(expected),
        "se": 0.0,
        "n_queries": 2,
    }
    assert by_level(table, "map") == {"L=2": {"distilled": pytest.approx(expected)}}
    assert "| distilled | 0.833 ± 0.000 |" in markdown_table(table)


def test_random_rankings_are_seeded_permutations_and_levels_scale() -> None:
    ids = np.arange(50)
    a, b = random_rankings([1, 2], ids, seed=3), random_rankings([1, 2], ids, seed=3)
    assert np.array_equal(a[1], b[1]) and sorted(a[2].tolist()) == ids.tolist() and not np.array_equal(a[1], a[2])
    assert levels_for(3000, [0.0033, 0.01, 0.033]) == [10, 30, 99]
    assert levels_for(100, [0.001, 0.002]) == [1]
