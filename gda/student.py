"""Distilling the teacher into the embedder: the student's settings, its inputs assembled from per-partition
feature arrays and the teacher's score rows, one call to `gda.embedder.train_embedder`, the saved embedder
and its learning curves.

The input of an item is concat(image feature, text feature) in that order, for training images (their
first caption) and generated queries (their prompt) alike; `feature_matrix` is the one place that joins the
two parts, so the asset that trains, the asset that embeds and the query service cannot disagree.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from gda import plots
from gda.arrays import IdArray
from gda.embedder import Embedder, EmbedderConfig, EpochRecord, Validation, save_embedder, train_embedder
from gda.ranking import PairRows, to_rows, training_pairs


@dataclass(frozen=True)
class StudentConfig:
    """Every student setting (``resources.StudentSettings`` documents each; its ``config()`` makes this)."""

    widths: tuple[int, ...]  # hidden widths, then the output width
    dropout: float
    normalise_parts: bool
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    seed: int
    top_k: int  # positions of each train query's teacher ranking learnt from
    p_negative: float
    per_query: int | None
    val_fraction_l: float
    loss: str = "bce"  # gda.embedder.LOSSES
    keep_best_epoch: bool = False

    def embedder_config(self, input_dim: int, image_dim: int) -> EmbedderConfig:
        return EmbedderConfig(
            input_dim=input_dim,
            image_dim=image_dim,
            widths=self.widths,
            dropout=self.dropout,
            normalise_parts=self.normalise_parts,
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            epochs=self.epochs,
            seed=self.seed,
            loss=self.loss,
            keep_best_epoch=self.keep_best_epoch,
        )


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
    training_pairs: PairRows  # what the embedder was fitted to, negatives included
    L: int  # positives per validation query for the validation mAP

    @property
    def pairs(self) -> int:
        return len(self.training_pairs)


def top_of_rankings(scores: pl.DataFrame, top_k: int) -> pl.DataFrame:
    """Each query's ``top_k`` best-ranked rows, labelled against ``top_k`` (rank / top_k): the student learns
    the top of the teacher's ranking; uniform positions over a full ranking rarely show it the top, which
    a prototype found much worse. Rankings no longer than ``top_k`` are unchanged."""
    return scores.filter(pl.col("rank") < top_k).with_columns(
        n_candidates=pl.min_horizontal(pl.col("n_candidates"), pl.lit(top_k)).cast(pl.Int32)
    )


def distill(
    config: StudentConfig,
    scores: pl.DataFrame,
    train: tuple[np.ndarray, np.ndarray],
    queries: tuple[np.ndarray, np.ndarray],
    image_dim: int,
    progress: bool = False,
) -> Distillation:
    """Train the embedder on the top ``config.top_k`` teacher rows of each query whose ``split`` is ``train``,
    validating on the whole stored rankings of the ``val`` queries (mAP at L = ``config.val_fraction_l`` of the
    training set, at least 1). ``train`` and ``queries`` are (ids, feature rows) from `feature_matrix`, whose
    first ``image_dim`` columns are the image part."""
    train_ids, train_features = train
    query_ids, query_features = queries
    rng = np.random.default_rng(config.seed)
    fitting = top_of_rankings(scores.filter(pl.col("split") == "train"), config.top_k)
    if fitting.is_empty():
        raise ValueError("no teacher scores for train-split queries; materialize abu_scores for the train batches")
    pairs = to_rows(training_pairs(fitting, train_ids, rng, config.p_negative, config.per_query), query_ids, train_ids)
    held_out = scores.filter(pl.col("split") == "val")
    L = max(1, round(config.val_fraction_l * len(train_ids)))
    validation = None
    if not held_out.is_empty():
        val_pairs = to_rows(training_pairs(held_out, train_ids, rng, 0.0), query_ids, train_ids)
        validation = Validation(query_features, val_pairs, L)
    embedder, history = train_embedder(
        config.embedder_config(train_features.shape[1], image_dim),
        query_features,
        train_features,
        pairs,
        validation,
        progress=progress,
    )
    return Distillation(embedder, history, fitting["query_id"].n_unique(), held_out["query_id"].n_unique(), pairs, L)


@dataclass(frozen=True)
class LearningCurves:
    loss_png: bytes  # train BCE per epoch, and validation BCE when there were val queries
    val_map_png: bytes | None  # validation mAP@L per epoch; None without val queries


def learning_curves(history: list[EpochRecord], L: int) -> LearningCurves:
    curves = {"train loss": [r.train_loss for r in history]}
    if history[-1].val_loss is not None:
        curves["val loss"] = [r.val_loss for r in history]
    val_map = None
    if history[-1].val_map is not None:
        maps = {f"val mAP@{L}": [r.val_map for r in history]}
        val_map = plots.line_plot_png(maps, "validation mAP", "epoch", "mAP")
    return LearningCurves(plots.line_plot_png(curves, "student loss", "epoch", "BCE"), val_map)


@dataclass(frozen=True)
class SavedDistillation:
    version: str  # of the saved embedder
    result: Distillation
    seconds: float  # of the distillation, without loading and saving
    curves: LearningCurves


def distill_and_save(
    config: StudentConfig,
    scores: pl.DataFrame,
    image_features: Mapping[str, IdArray],
    text_features: Mapping[str, IdArray],
    query_image_features: Mapping[str, IdArray],
    query_text_features: Mapping[str, IdArray],
    folder: Path,
) -> SavedDistillation:
    """`distill` on every partition of the training and query features (``scores``: the ``student_scores``
    rows), the embedder saved in ``folder``, with its learning curves."""
    train = feature_matrix(image_features, text_features)
    queries = feature_matrix(query_image_features, query_text_features)
    image_dim = next(iter(image_features.values())).values.shape[1]
    started = time.perf_counter()
    result = distill(config, scores, train, queries, image_dim)
    seconds = time.perf_counter() - started
    version = save_embedder(folder, result.embedder)
    return SavedDistillation(version, result, seconds, learning_curves(result.history, result.L))
