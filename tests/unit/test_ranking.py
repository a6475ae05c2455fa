"""gda.ranking: rank labels, random negatives outside the candidates, subsampling, id → row maps, epochs."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import polars as pl
import pytest

from gda.ranking import Pairs, epoch_batches, row_positions, to_rows, training_pairs

# Ids unlike positions (and unsorted) to catch id/position mix-ups.
TRAIN_IDS = np.random.default_rng(99).permutation(np.arange(1000, 1000 + 3 * 600, 3)).astype(np.int64)


def teacher_scores(n_queries: int, train_ids: np.ndarray, sizes: list[int], seed: int) -> pl.DataFrame:
    """Each query gets `sizes[q % len(sizes)]` distinct candidates with a random teacher rank."""
    rng = np.random.default_rng(seed)
    frames = []
    for q in range(n_queries):
        k = sizes[q % len(sizes)]
        frames.append(
            pl.DataFrame(
                {
                    "query_id": np.full(k, 500 + 7 * q, dtype=np.int64),
                    "train_id": rng.choice(train_ids, size=k, replace=False),
                    "rank": rng.permutation(k).astype(np.int32),
                    "n_candidates": np.full(k, k, dtype=np.int32),
                }
            )
        )
    return pl.concat(frames)


def as_frame(pairs: Pairs) -> pl.DataFrame:
    return pl.DataFrame({"query_id": pairs.query_ids, "train_id": pairs.train_ids, "label": pairs.labels})


def candidate_sets(scores: pl.DataFrame) -> dict[int, set[int]]:
    sets: dict[int, set[int]] = {}
    for query_id, train_id in scores.select("query_id", "train_id").iter_rows():
        sets.setdefault(query_id, set()).add(train_id)
    return sets


def test_labels_are_rank_over_n_candidates() -> None:
    scores = teacher_scores(30, TRAIN_IDS, [10, 25, 40], seed=0)
    pairs = training_pairs(scores, TRAIN_IDS, np.random.default_rng(0), p_negative=0.0)
    assert len(pairs.labels) == len(scores)
    joined = as_frame(pairs).join(scores, on=["query_id", "train_id"], how="inner")
    assert len(joined) == len(scores)
    expected = np.array(
        [r / n for r, n in zip(joined["rank"].to_list(), joined["n_candidates"].to_list(), strict=True)]
    )
    np.testing.assert_allclose(joined["label"].to_numpy(), expected, rtol=1e-6)
    assert pairs.labels.dtype == np.float32 and pairs.labels.max() < 1.0


def test_negatives_are_outside_the_query_candidates_with_label_one() -> None:
    scores = teacher_scores(200, TRAIN_IDS, [30, 50, 70], seed=1)
    p = 0.1
    pairs = training_pairs(scores, TRAIN_IDS, np.random.default_rng(1), p_negative=p)
    n = len(pairs.labels)
    negative = pairs.labels == 1.0
    # binomial(n, p): 5 standard deviations either side
    assert abs(negative.sum() - n * p) < 5 * math.sqrt(n * p * (1 - p))
    sets = candidate_sets(scores)
    for query_id, train_id in zip(pairs.query_ids[negative], pairs.train_ids[negative], strict=True):
        assert train_id not in sets[query_id]
    assert np.isin(pairs.train_ids[negative], TRAIN_IDS).all()
    # Spread like uniform draws (each query excludes < 12% of the ids), not a few repeated ids.
    uniform_distinct = len(TRAIN_IDS) * (1 - (1 - 1 / len(TRAIN_IDS)) ** negative.sum())
    assert len(np.unique(pairs.train_ids[negative])) > 0.9 * uniform_distinct
    # The positive pairs are the teacher's own rows, untouched.
    kept = as_frame(pairs).filter(pl.col("label") < 1.0)
    assert len(kept.join(scores, on=["query_id", "train_id"], how="anti")) == 0


def test_negatives_reach_every_non_candidate_when_few_remain() -> None:
    # 50 training ids, 45 candidates per query, every pair a negative: redraws must land on the 5 others, and
    # 45 draws miss one of them with probability 5 × 0.8^45 ≈ 2e-4.
    train_ids = np.arange(50, dtype=np.int64) * 10
    scores = teacher_scores(20, train_ids, [45], seed=2)
    pairs = training_pairs(scores, train_ids, np.random.default_rng(2), p_negative=1.0)
    assert (pairs.labels == 1.0).all()
    sets = candidate_sets(scores)
    negative = pairs.labels == 1.0
    for query_id in sets:
        drawn = set(pairs.train_ids[negative & (pairs.query_ids == query_id)].tolist())
        assert drawn == set(train_ids.tolist()) - sets[query_id]


def test_deterministic_given_the_generator() -> None:
    scores = teacher_scores(40, TRAIN_IDS, [20, 35], seed=3)
    one = training_pairs(scores, TRAIN_IDS, np.random.default_rng(7), p_negative=0.2, per_query=12)
    two = training_pairs(scores, TRAIN_IDS, np.random.default_rng(7), p_negative=0.2, per_query=12)
    other = training_pairs(scores, TRAIN_IDS, np.random.default_rng(8), p_negative=0.2, per_query=12)
    for field in ("query_ids", "train_ids", "labels"):
        np.testing.assert_array_equal(getattr(one, field), getattr(two, field))
    assert not np.array_equal(one.train_ids, other.train_ids)


def test_subsampling_keeps_m_random_candidates_per_query() -> None:
    scores = teacher_scores(30, TRAIN_IDS, [5, 20, 40], seed=4)
    m = 12
    pairs = training_pairs(scores, TRAIN_IDS, np.random.default_rng(4), p_negative=0.0, per_query=m)
    sizes = scores.group_by("query_id").len()
    counts = as_frame(pairs).group_by("query_id").len().join(sizes, on="query_id", suffix="_all")
    assert (counts["len"] == np.minimum(counts["len_all"], m)).all()
    joined = as_frame(pairs).join(scores, on=["query_id", "train_id"], how="inner")
    assert len(joined) == len(pairs.labels)  # distinct, all candidates, labels of the full ranking
    np.testing.assert_allclose(
        joined["label"].to_numpy(), (joined["rank"] / joined["n_candidates"]).to_numpy(), rtol=1e-6
    )
    # A different generator picks a different subset; over many draws every candidate gets picked.
    seen = set()
    for seed in range(30):
        again = training_pairs(scores, TRAIN_IDS, np.random.default_rng(seed), p_negative=0.0, per_query=m)
        seen |= set(zip(again.query_ids.tolist(), again.train_ids.tolist(), strict=True))
    assert seen == set(scores.select("query_id", "train_id").iter_rows())


def test_large_training_set_without_per_query_complements() -> None:
    # 200k training images, 300 queries × 1000 candidates: complement lists would hold 300 × 199k ids
    # (~480 MB); the sorted-key rejection needs a few arrays of the pairs' size.
    rng = np.random.default_rng(5)
    train_ids = rng.permutation(200_000).astype(np.int64) * 2 + 1
    n_queries, k = 300, 1000
    scores = pl.DataFrame(
        {
            "query_id": np.repeat(np.arange(n_queries, dtype=np.int64), k),
            "train_id": np.concatenate([rng.choice(train_ids[:5000], size=k, replace=False) for _ in range(n_queries)]),
            "rank": np.tile(np.arange(k, dtype=np.int32), n_queries),
            "n_candidates": np.full(n_queries * k, k, dtype=np.int32),
        }
    )
    tracemalloc.start()
    pairs = training_pairs(scores, train_ids, np.random.default_rng(5), p_negative=0.5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20
    negative = pl.DataFrame({"query_id": pairs.query_ids, "train_id": pairs.train_ids}).filter(pairs.labels == 1.0)
    assert abs(len(negative) - 150_000) < 5 * math.sqrt(300_000 * 0.25)
    assert len(negative.join(scores, on=["query_id", "train_id"], how="inner")) == 0
    assert np.isin(negative["train_id"].to_numpy(), train_ids).all()


def test_invalid_teacher_rows_are_refused() -> None:
    scores = teacher_scores(3, TRAIN_IDS, [10], seed=6)
    with pytest.raises(ValueError, match=r"candidate train ids are not among .* \[12345\]"):
        training_pairs(
            scores.with_columns(pl.lit(12345, dtype=pl.Int64).alias("train_id")), TRAIN_IDS, np.random.default_rng(0)
        )
    with pytest.raises(ValueError, match="rank"):
        training_pairs(scores.with_columns(pl.col("n_candidates").alias("rank")), TRAIN_IDS, np.random.default_rng(0))
    with pytest.raises(ValueError, match="more than once"):
        training_pairs(pl.concat([scores, scores.head(1)]), TRAIN_IDS, np.random.default_rng(0))
    with pytest.raises(ValueError, match="lack columns"):
        training_pairs(scores.drop("n_candidates"), TRAIN_IDS, np.random.default_rng(0))
    everything = teacher_scores(1, TRAIN_IDS[:10], [10], seed=6)
    with pytest.raises(ValueError, match="every training image"):
        training_pairs(everything, TRAIN_IDS[:10], np.random.default_rng(0))
    assert len(training_pairs(everything, TRAIN_IDS[:10], np.random.default_rng(0), p_negative=0.0).labels) == 10


def test_row_positions_and_clear_error() -> None:
    row_ids = np.array([40, 10, 30, 20], dtype=np.int64)
    np.testing.assert_array_equal(row_positions(np.array([10, 20, 40, 10]), row_ids), [1, 3, 0, 1])
    with pytest.raises(ValueError, match=r"2 train ids are not among the 4 feature rows, e.g. \[11, 99\]"):
        row_positions(np.array([10, 99, 11, 99]), row_ids, "train ids")
    with pytest.raises(ValueError, match="repeat"):
        row_positions(np.array([10]), np.array([10, 10]))


def test_to_rows_maps_ids_to_feature_rows() -> None:
    scores = teacher_scores(10, TRAIN_IDS, [15], seed=7)
    pairs = training_pairs(scores, TRAIN_IDS, np.random.default_rng(0), p_negative=0.3)
    query_row_ids = np.random.default_rng(1).permutation(np.unique(pairs.query_ids))
    rows = to_rows(pairs, query_row_ids, TRAIN_IDS)
    np.testing.assert_array_equal(query_row_ids[rows.query_rows], pairs.query_ids)
    np.testing.assert_array_equal(TRAIN_IDS[rows.train_rows], pairs.train_ids)
    np.testing.assert_array_equal(rows.labels, pairs.labels)
    with pytest.raises(ValueError, match="query ids are not among"):
        to_rows(pairs, query_row_ids[1:], TRAIN_IDS)


def test_epoch_batches_cover_every_pair_once_in_a_new_order() -> None:
    scores = teacher_scores(20, TRAIN_IDS, [50], seed=8)
    pairs = training_pairs(scores, TRAIN_IDS, np.random.default_rng(0))
    rows = to_rows(pairs, np.unique(pairs.query_ids), TRAIN_IDS)
    rng = np.random.default_rng(3)
    epochs = [list(epoch_batches(rows, 128, rng)) for _ in range(2)]
    keys = rows.query_rows * len(TRAIN_IDS) + rows.train_rows
    orders = []
    for batches in epochs:
        assert [len(b.labels) for b in batches] == [128] * 7 + [1000 - 7 * 128]
        q = np.concatenate([b.query_rows.numpy() for b in batches])
        t = np.concatenate([b.train_rows.numpy() for b in batches])
        y = np.concatenate([b.labels.numpy() for b in batches])
        np.testing.assert_array_equal(np.sort(q * len(TRAIN_IDS) + t), np.sort(keys))
        lookup = dict(zip(keys.tolist(), rows.labels.tolist(), strict=True))
        assert [lookup[k] for k in (q * len(TRAIN_IDS) + t).tolist()] == y.tolist()
        orders.append(q * len(TRAIN_IDS) + t)
    assert not np.array_equal(orders[0], orders[1])
    replay = np.concatenate([b.query_rows.numpy() for b in epoch_batches(rows, 128, np.random.default_rng(3))])
    np.testing.assert_array_equal(replay, np.concatenate([b.query_rows.numpy() for b in epochs[0]]))
