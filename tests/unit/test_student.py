"""gda.student: the one join of image and text features, the top-K labels, and a distillation that fits on
the train split and validates on the whole rankings of the val split."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from gda.arrays import IdArray
from gda.student import StudentConfig, distill, feature_matrix, top_of_rankings


def _array(ids: list[int], dim: int, offset: float) -> IdArray:
    values = np.arange(len(ids) * dim, dtype=np.float32).reshape(len(ids), dim) + offset
    return IdArray(ids=np.asarray(ids, dtype=np.int64), values=values)


def test_feature_matrix_puts_the_image_part_first_in_partition_order() -> None:
    image = {"00001": _array([5, 6], 3, 100.0), "00000": _array([1, 2], 3, 0.0)}
    text = {"00000": _array([1, 2], 2, -1.0), "00001": _array([5, 6], 2, -2.0)}
    ids, values = feature_matrix(image, text)
    assert ids.tolist() == [1, 2, 5, 6]
    assert np.array_equal(values[2], np.concatenate([image["00001"].values[0], text["00001"].values[0]]))
    with pytest.raises(ValueError, match="different ids"):
        feature_matrix(image, {"00000": _array([1, 3], 2, 0.0), "00001": text["00001"]})


def test_top_of_rankings_keeps_the_best_k_labelled_against_k() -> None:
    scores = pl.DataFrame(
        {
            "query_id": [1] * 6 + [2] * 2,
            "train_id": list(range(6)) + [10, 11],
            "rank": [0, 1, 2, 3, 4, 5, 1, 0],
            "n_candidates": [6] * 6 + [2] * 2,
        },
        schema_overrides={"rank": pl.Int32, "n_candidates": pl.Int32},
    )
    top = top_of_rankings(scores, 3)
    assert top.filter(pl.col("query_id") == 1)["train_id"].to_list() == [0, 1, 2]
    assert top["n_candidates"].to_list() == [3, 3, 3, 2, 2]  # a ranking shorter than k is kept whole


def test_distill_fits_on_train_queries_and_validates_on_whole_val_rankings() -> None:
    rng = np.random.default_rng(0)
    n_train, n_queries, dim = 120, 30, 8
    train = (np.arange(n_train, dtype=np.int64), rng.standard_normal((n_train, dim)).astype(np.float32))
    queries = (
        np.arange(1000, 1000 + n_queries, dtype=np.int64),
        rng.standard_normal((n_queries, dim)).astype(np.float32),
    )
    rows = []
    for row, query_id in enumerate(queries[0]):
        order = np.argsort(-(train[1] @ queries[1][row]))
        split = "val" if row < 6 else "train"
        rows += [(int(query_id), int(train[0][i]), rank, n_train, split) for rank, i in enumerate(order)]
    scores = pl.DataFrame(
        rows, schema=["query_id", "train_id", "rank", "n_candidates", "split"], orient="row"
    ).with_columns(pl.col("rank").cast(pl.Int32), pl.col("n_candidates").cast(pl.Int32))
    config = StudentConfig(
        widths=(16, 8),
        dropout=0.1,
        normalise_parts=True,
        lr=1e-2,
        weight_decay=0.01,
        batch_size=256,
        epochs=2,
        seed=0,
        top_k=20,
        p_negative=0.1,
        per_query=None,
        val_fraction_l=0.1,
    )
    result = distill(config, scores, train, queries, image_dim=4)
    assert (result.train_queries, result.val_queries, result.L) == (24, 6, 12)
    assert result.pairs == 24 * 20
    assert len(result.history) == 2 and all(0 <= r.val_map <= 1 for r in result.history)
    with pytest.raises(ValueError, match="train-split"):
        distill(config, scores.filter(pl.col("split") == "val"), train, queries, image_dim=4)
