"""Ranking agreement with the teacher: average precision over a full ranking and mAP(L) over queries.

mAP(L) (method.md, "Evaluation"): per query the teacher's top L are the positives, and AP is computed over the
method's ranking of the whole candidate set, never a truncated top-k, so a method is not rewarded for
missing positives it never returned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np


class MapResult(NamedTuple):
    mean: float
    standard_error: float  # of the mean over queries; nan for fewer than two queries
    n_queries: int


def average_precision(ranked_ids: np.ndarray, positive_ids: np.ndarray) -> float:
    """Mean over the positives of the precision at each positive's position in `ranked_ids` (best first).

    A positive absent from the ranking contributes precision 0, as one that is never retrieved.
    """
    ranked = np.asarray(ranked_ids)
    positives = np.unique(np.asarray(positive_ids))
    if not positives.size:
        raise ValueError("average precision needs at least one positive")
    if len(np.unique(ranked)) != len(ranked):
        raise ValueError("ranked_ids repeat an id")
    positions = np.flatnonzero(np.isin(ranked, positives))
    return float(np.sum(np.arange(1, len(positions) + 1) / (positions + 1)) / len(positives))


def random_average_precision(n_items: int, n_positives: int) -> float:
    """Expected AP of a uniformly random ranking of `n_items` of which `n_positives` are positives.

    A positive at position n (uniform on 1..N) has on average (R - 1)(n - 1)/(N - 1) other positives above it, so
    E[AP] = (1/N) Σ_n [1 + (R - 1)(n - 1)/(N - 1)] / n = (H_N + (R - 1)(N - H_N)/(N - 1)) / N.
    """
    if not 1 <= n_positives <= n_items:
        raise ValueError(f"need 1 <= n_positives <= n_items, got {n_positives} and {n_items}")
    if n_items == 1:
        return 1.0
    harmonic = float(np.sum(1.0 / np.arange(1, n_items + 1)))
    return (harmonic + (n_positives - 1) * (n_items - harmonic) / (n_items - 1)) / n_items


def map_at(teacher_rankings: Mapping[int, np.ndarray], method_rankings: Mapping[int, np.ndarray], L: int) -> MapResult:
    """mAP(L) over the teacher's queries: positives are the teacher's top L; AP over the method's full ranking.

    Each ranking is a query's train ids, best first; the method must rank exactly the teacher's set.
    """
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    if not teacher_rankings:
        raise ValueError("no queries to evaluate")
    values = []
    for query_id, teacher in teacher_rankings.items():
        if query_id not in method_rankings:
            raise ValueError(f"the method has no ranking for query {query_id}")
        method = np.asarray(method_rankings[query_id])
        teacher = np.asarray(teacher)
        if len(method) != len(teacher) or not np.array_equal(np.sort(method), np.sort(teacher)):
            raise ValueError(f"query {query_id}: the method ranks another set than the teacher")
        values.append(average_precision(method, teacher[:L]))
    mean, error = mean_and_standard_error(values)
    return MapResult(mean, error, len(values))


def mean_and_standard_error(values) -> tuple[float, float]:
    """The mean of `values` and its standard error (sample std / sqrt n); nan error for fewer than two."""
    array = np.asarray(values, dtype=np.float64)
    if not array.size:
        raise ValueError("no values to average")
    error = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else math.nan
    return float(array.mean()), error
