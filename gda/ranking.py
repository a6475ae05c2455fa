"""Training pairs for the student from the teacher's rankings: soft rank labels, random negatives, minibatches.

A teacher row is one (query, candidate) with the candidate's AbU+ rank (0 = most influential) among the query's
`n_candidates`. Its label is rank / n_candidates, so 0 is the most influential and 1 is reserved for negatives:
with probability `p_negative` a pair is replaced by a random training image outside that query's candidates
(method.md, "Student"). Negatives are drawn and redrawn where they hit a candidate, against one sorted array of
(query, candidate) keys: memory stays O(pairs), where per-query complement lists would need O(queries × N).

The trainer works on feature rows, not ids: `to_rows` maps the pairs' ids to row positions once, and
`epoch_batches` shuffles those rows into minibatches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

SCORE_COLUMNS = ("query_id", "train_id", "rank", "n_candidates")


@dataclass(frozen=True)
class Pairs:
    """One training pair per row, by id; label 1.0 marks a negative."""

    query_ids: np.ndarray  # int64
    train_ids: np.ndarray  # int64
    labels: np.ndarray  # float32 in [0, 1]

    def __post_init__(self) -> None:
        if not len(self.query_ids) == len(self.train_ids) == len(self.labels):
            raise ValueError("query_ids, train_ids and labels need one entry per pair")


@dataclass(frozen=True)
class PairRows:
    """The same pairs as row positions into a query feature matrix and a training feature matrix."""

    query_rows: np.ndarray  # int64
    train_rows: np.ndarray  # int64
    labels: np.ndarray  # float32

    def __post_init__(self) -> None:
        if not len(self.query_rows) == len(self.train_rows) == len(self.labels):
            raise ValueError("query_rows, train_rows and labels need one entry per pair")

    def __len__(self) -> int:
        return len(self.labels)


class PairBatch(NamedTuple):
    query_rows: torch.Tensor  # int64
    train_rows: torch.Tensor  # int64
    labels: torch.Tensor  # float32


def row_positions(ids: np.ndarray, row_ids: np.ndarray, what: str = "ids") -> np.ndarray:
    """Position of each of `ids` in `row_ids` (the ids of a feature matrix's rows, any order), int64.

    Raises ValueError naming the ids that have no row, or the row ids that repeat.
    """
    ids = np.asarray(ids, dtype=np.int64)
    row_ids = np.asarray(row_ids, dtype=np.int64)
    order = np.argsort(row_ids, kind="stable")
    sorted_ids = row_ids[order]
    repeated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if repeated.size:
        raise ValueError(f"feature row ids repeat, e.g. {np.unique(repeated)[:10].tolist()}")
    if ids.size and not row_ids.size:
        raise ValueError(f"{len(np.unique(ids))} {what} but no feature rows")
    where = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
    found = sorted_ids[where] == ids
    if not found.all():
        missing = np.unique(ids[~found])
        raise ValueError(
            f"{len(missing)} {what} are not among the {len(row_ids)} feature rows, e.g. {missing[:10].tolist()}"
        )
    return order[where].astype(np.int64)


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if not sorted_keys.size:
        return np.zeros(len(keys), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[where] == keys


def _draw_outside(
    query_index: np.ndarray, candidate_keys: np.ndarray, n_train: int, rng: np.random.Generator
) -> np.ndarray:
    """Uniform training positions, each outside its query's candidates (key = query index × n_train + position)."""
    positions = rng.integers(0, n_train, size=len(query_index))
    todo = np.arange(len(query_index))
    while todo.size:
        todo = todo[_contains(candidate_keys, query_index[todo] * n_train + positions[todo])]
        positions[todo] = rng.integers(0, n_train, size=len(todo))
    return positions


def _subsample(query_index: np.ndarray, per_query: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of at most `per_query` uniformly chosen candidates per query, in their original order."""
    order = np.lexsort((rng.random(len(query_index)), query_index))
    grouped = query_index[order]
    within = np.arange(len(order)) - np.searchsorted(grouped, grouped, side="left")
    return np.sort(order[within < per_query])


def training_pairs(
    scores: pl.DataFrame,
    train_ids: np.ndarray,
    rng: np.random.Generator,
    p_negative: float = 0.1,
    per_query: int | None = None,
) -> Pairs:
    """The student's pairs from teacher rows (query_id, train_id, rank, n_candidates), deterministic given `rng`.

    `per_query` keeps a uniform random subset of that many candidates per query (None: all); labels stay
    rank / n_candidates of the full ranking. Each kept pair is then, with probability `p_negative`, replaced by
    a uniform draw from `train_ids` outside that query's candidates (all of them, kept or not), label 1.0.
    Negatives are drawn independently, so a query may get the same negative twice.
    """
    if not 0.0 <= p_negative <= 1.0:
        raise ValueError(f"p_negative must lie in [0, 1], got {p_negative}")
    if per_query is not None and per_query < 1:
        raise ValueError(f"per_query must be >= 1 or None, got {per_query}")
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns]
    if missing:
        raise ValueError(f"teacher scores lack columns {missing}")
    query_ids = scores["query_id"].to_numpy().astype(np.int64)
    candidates = scores["train_id"].to_numpy().astype(np.int64)
    ranks = scores["rank"].to_numpy().astype(np.int64)
    n_candidates = scores["n_candidates"].to_numpy().astype(np.int64)
    if np.any((ranks < 0) | (ranks >= n_candidates)):
        raise ValueError("every rank must lie in [0, n_candidates)")

    universe = np.unique(np.asarray(train_ids, dtype=np.int64))
    queries, query_index = np.unique(query_ids, return_inverse=True)
    keys = np.sort(query_index * len(universe) + row_positions(candidates, universe, "candidate train ids"))
    if np.any(keys[1:] == keys[:-1]):
        raise ValueError("a (query_id, train_id) pair appears more than once in the teacher scores")
    if p_negative > 0:
        full = queries[np.bincount(query_index, minlength=len(queries)) >= len(universe)]
        if full.size:
            raise ValueError(f"queries {full[:10].tolist()} have every training image as a candidate: no negatives")

    kept = np.arange(len(scores)) if per_query is None else _subsample(query_index, per_query, rng)
    labels = (ranks[kept] / n_candidates[kept]).astype(np.float32)
    pair_train = candidates[kept]
    negative = rng.random(len(kept)) < p_negative
    pair_train[negative] = universe[_draw_outside(query_index[kept][negative], keys, len(universe), rng)]
    labels[negative] = 1.0
    return Pairs(query_ids[kept], pair_train, labels)


def to_rows(pairs: Pairs, query_row_ids: np.ndarray, train_row_ids: np.ndarray) -> PairRows:
    """`pairs` as row positions into matrices whose rows hold `query_row_ids` and `train_row_ids`."""
    return PairRows(
        row_positions(pairs.query_ids, query_row_ids, "query ids"),
        row_positions(pairs.train_ids, train_row_ids, "train ids"),
        pairs.labels.astype(np.float32),
    )


def epoch_batches(rows: PairRows, batch_size: int, rng: np.random.Generator) -> Iterator[PairBatch]:
    """One epoch: every pair once, in a fresh random order from `rng`, `batch_size` pairs per batch (last smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = rng.permutation(len(rows))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield PairBatch(
            torch.from_numpy(rows.query_rows[chunk]),
            torch.from_numpy(rows.train_rows[chunk]),
            torch.from_numpy(rows.labels[chunk]),
        )
