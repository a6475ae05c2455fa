"""Distilling the teacher into the embedder: the student's inputs assembled from per-partition feature
arrays and the teacher's score rows, then one call to `gda.embedder.train_embedder`.

The input of an item is concat(image feature, text feature) in that order, for training images (their
first caption) and generated queries (their prompt) alike; `feature_matrix` is the one place that joins the
two parts, so the asset that trains, the asset that embeds and the query service cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl

from gda.arrays import IdArray
from gda.embedder import Embedder, EmbedderConfig, EpochRecord, Validation, train_embedder
from gda.ranking import to_rows, training_pairs


def feature_matrix(
    image: Mapping[str, IdArray] | IdArray, text: Mapping[str, IdArray] | IdArray
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, concat(image, text) rows) over every partition, in partition-key then row order; the two parts
    must hold the same ids in the same order (they are computed from the same rows)."""
    image_parts = [image] if isinstance(image, IdArray) else [image[key] for key in sorted(image)]
    text_parts = [text] if isinstance(text, IdArray) else [text[key] for key in sorted(text)]
    ids = np.concatenate([a.ids for a in image_parts])
    text_ids = np.concatenate([a.ids for a in text_parts])
    if not np.array_equal(ids, text_ids):
        raise ValueError("image and text features hold different ids; re-materialize both feature assets")
    values = np.concatenate(
        [np.concatenate([a.values for a in image_parts]), np.concatenate([a.values for a in text_parts])], axis=1
    )
    return ids, values.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Distillation:
    embedder: Embedder
    history: list[EpochRecord]
    train_queries: int
    val_queries: int
    pairs: int
    L: int  # positives per validation query for the validation mAP


def top_of_rankings(scores: pl.DataFrame, top_k: int) -> pl.DataFrame:
    """Each query's ``top_k`` best-ranked rows, labelled against ``top_k`` (rank / top_k): the student learns
    the top of the teacher's ranking; uniform positions over a full ranking rarely show it the top, which
    a prototype found much worse. Rankings no longer than ``top_k`` are unchanged."""
    return scores.filter(pl.col("rank") < top_k).with_columns(
        n_candidates=pl.min_horizontal(pl.col("n_candidates"), pl.lit(top_k)).cast(pl.Int32)
    )


def distill(
    config: EmbedderConfig,
    scores: pl.DataFrame,
    train: tuple[np.ndarray, np.ndarray],
    queries: tuple[np.ndarray, np.ndarray],
    top_k: int,
    p_negative: float,
    per_query: int | None,
    val_fraction_l: float,
    progress: bool = False,
) -> Distillation:
    """Train the embedder on the top ``top_k`` teacher rows of each query whose ``split`` is ``train``,
    validating on the whole stored rankings of the ``val`` queries (mAP at L = ``val_fraction_l`` of the
    training set, at least 1). ``train`` and ``queries`` are (ids, feature rows) from `feature_matrix`."""
    train_ids, train_features = train
    query_ids, query_features = queries
    rng = np.random.default_rng(config.seed)
    fitting = top_of_rankings(scores.filter(pl.col("split") == "train"), top_k)
    if fitting.is_empty():
        raise ValueError("no teacher scores for train-split queries; materialize abu_scores for the train batches")
    pairs = to_rows(training_pairs(fitting, train_ids, rng, p_negative, per_query), query_ids, train_ids)
    held_out = scores.filter(pl.col("split") == "val")
    L = max(1, round(val_fraction_l * len(train_ids)))
    validation = None
    if not held_out.is_empty():
        val_pairs = to_rows(training_pairs(held_out, train_ids, rng, 0.0), query_ids, train_ids)
        validation = Validation(query_features, val_pairs, L)
    embedder, history = train_embedder(config, query_features, train_features, pairs, validation, progress=progress)
    return Distillation(
        embedder, history, fitting["query_id"].n_unique(), held_out["query_id"].n_unique(), len(pairs), L
    )
