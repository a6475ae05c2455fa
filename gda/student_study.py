"""The student design study: train the students of one study arm (`gda.study_arms`) from the teacher scores
and features already stored, with several seeds, and measure each on the test queries with `rank_eval`'s
own mAP(L) code. The teacher is never run here: every arm reads the same ``abu_scores``.

One row per (arm, seed, L) of ``student_study``; every setting the arm varies is a column, so the table reads
as the paper's ablations, with seed noise next to each effect (`summary`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from gda import plots, tables
from gda.evaluation import Features, cosine_rankings, levels_for, rank_table, restrict, teacher_rankings
from gda.reranker import PairInputs, RerankerConfig, rerank, train_reranker
from gda.store import Store
from gda.student import StudentConfig, distill
from gda.study_arms import StudyArm


@dataclass(frozen=True)
class StudyInputs:
    """What every arm trains and measures on, read once per arm from the home."""

    scores: pl.DataFrame  # every split's teacher rows: query_id, train_id, rank, n_candidates, split
    train: tuple[np.ndarray, np.ndarray]  # (ids, concat(image, text) features) of the training images
    queries: tuple[np.ndarray, np.ndarray]  # ... of the generated queries
    image_dim: int
    teacher: Mapping[int, np.ndarray]  # the teacher's ranking of each test query, best first
    levels: Sequence[int]


def study_inputs(
    arm: StudyArm, store: Store, features: Features, l_fractions: Sequence[float], device: str
) -> StudyInputs:
    """What ``arm`` trains on; the generator's image features are computed here when the arm asks for them
    (the model on ``device``), since no other asset needs them."""
    if arm.features == "generator":
        from gda.generator_features import with_generator_images

        features = with_generator_images(store, features, device)
    train = features.training()
    return StudyInputs(
        scores=store.tables.named("study_scores"),
        train=train,
        queries=features.queries(),
        image_dim=next(iter(features.image.values())).values.shape[1],
        teacher=teacher_rankings(store),
        levels=levels_for(len(train[0]), l_fractions),
    )


def arm_scores(arm: StudyArm, scores: pl.DataFrame) -> pl.DataFrame:
    """The teacher rows the arm learns from (split ``train``) and validates on (``val``)."""
    if arm.oracle:
        # The test queries' own rankings become the training rows: the bound of what the features and the
        # student can represent, with no generalisation to new queries asked of it.
        return scores.filter(pl.col("split") != "train").with_columns(
            split=pl.when(pl.col("split") == "test").then(pl.lit("train")).otherwise(pl.col("split"))
        )
    scores = scores.filter(pl.col("split") != "test")
    if arm.train_queries is None:
        return scores
    train = scores.filter(pl.col("split") == "train")["query_id"].unique().sort()
    if len(train) < arm.train_queries:
        raise ValueError(
            f"study arm {arm.name} needs {arm.train_queries} train queries but the home has {len(train)}; "
            "materialize more train query batches (query_plan.n_train) or leave this arm out"
        )
    kept = train.head(arm.train_queries)
    return scores.filter((pl.col("split") == "val") | pl.col("query_id").is_in(kept.implode()))


def _visible(features: tuple[np.ndarray, np.ndarray], part: str, image_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The features with the part the arm hides set to zero (a zero part stays zero when normalised)."""
    if part in ("concat", "generator"):
        return features
    ids, values = features
    values = values.copy()
    hidden = slice(image_dim, None) if part == "image" else slice(0, image_dim)
    values[:, hidden] = 0.0
    return ids, values


def run_arm(arm: StudyArm, base: StudentConfig, inputs: StudyInputs, seeds: Sequence[int]) -> pl.DataFrame:
    """The rows of ``student_study`` for ``arm``: one student per seed, each measured at every level."""
    scores = arm_scores(arm, inputs.scores)
    train = _visible(inputs.train, arm.features, inputs.image_dim)
    queries = _visible(inputs.queries, arm.features, inputs.image_dim)
    train_ids, train_features = train
    query_ids, query_features = queries
    rows = {int(q): i for i, q in enumerate(query_ids) if int(q) in inputs.teacher}
    frames = []
    for seed in seeds:
        config = replace(base, seed=seed, **dict(arm.student))
        started = time.perf_counter()
        result = distill(config, scores, train, queries, inputs.image_dim)
        embedder = result.embedder
        query_vectors, train_vectors = embedder.embed_queries(query_features), embedder.embed_training(train_features)
        ranking = cosine_rankings(query_vectors, train_vectors, rows, train_ids)
        if arm.rerank_m is not None:
            pair_inputs = PairInputs(query_vectors, train_vectors, query_features, train_features, inputs.image_dim)
            second = RerankerConfig(top_m=arm.rerank_m, seed=seed)
            reranker = train_reranker(second, pair_inputs, result.training_pairs)
            ranking = rerank(reranker, pair_inputs, ranking, rows, train_ids)
        seconds = time.perf_counter() - started
        table = rank_table(inputs.teacher, {"distilled": restrict(ranking, inputs.teacher)}, inputs.levels)
        val_maps = [r.val_map for r in result.history if r.val_map is not None]
        kept_epoch = int(np.argmax(val_maps)) + 1 if config.keep_best_epoch and val_maps else len(result.history)
        frames.append(
            table.drop("method").with_columns(
                arm=pl.lit(arm.name),
                axis=pl.lit(arm.axis),
                seed=pl.lit(seed),
                train_queries=pl.lit(result.train_queries),
                pairs=pl.lit(result.pairs),
                features=pl.lit(arm.features),
                normalise_parts=pl.lit(config.normalise_parts),
                loss=pl.lit(config.loss),
                top_k=pl.lit(config.top_k),
                per_query=pl.lit(config.per_query, dtype=pl.Int32),
                p_negative=pl.lit(config.p_negative),
                widths=pl.lit("-".join(map(str, config.widths))),
                epochs=pl.lit(config.epochs),
                kept_epoch=pl.lit(kept_epoch),
                oracle=pl.lit(arm.oracle),
                val_map=pl.lit(val_maps[kept_epoch - 1] if val_maps else None, dtype=pl.Float64),
                train_seconds=pl.lit(seconds),
                rerank_m=pl.lit(arm.rerank_m, dtype=pl.Int32),
            )
        )
    return tables.conform("student_study", pl.concat(frames))


def summary(rows: pl.DataFrame) -> pl.DataFrame:
    """Per arm and L: the mean mAP over seeds, the seeds' spread (max - min), the mean standard error over
    queries, and the mean train time; arms in the order they were defined (their first row)."""
    return (
        rows.with_row_index("order")
        .group_by("arm", "L")
        .agg(
            pl.col("order").min(),
            pl.col("axis").first(),
            pl.col("train_queries").first(),
            seeds=pl.col("seed").n_unique(),
            map=pl.col("map").mean(),
            seed_spread=pl.col("map").max() - pl.col("map").min(),
            se=pl.col("se").mean(),
            train_seconds=pl.col("train_seconds").mean(),
        )
        .sort("order", "L")
        .drop("order")
    )


def markdown_table(rows: pl.DataFrame) -> str:
    """One line per arm: mAP at each L as mean over seeds (± query standard error, seed spread)."""
    table = summary(rows)
    levels = sorted(table["L"].unique().to_list())
    lines = [
        "| arm | axis | train queries | " + " | ".join(f"mAP({level})" for level in levels) + " | train s |",
        "|---" * (len(levels) + 4) + "|",
    ]
    for (arm,), group in table.group_by("arm", maintain_order=True):
        cells = [
            f"{r['map']:.3f} ± {r['se']:.3f} (seeds ±{r['seed_spread'] / 2:.3f})"
            for r in group.sort("L").iter_rows(named=True)
        ]
        first = group.row(0, named=True)
        lines.append(
            f"| {arm} | {first['axis']} | {first['train_queries']} | "
            + " | ".join(cells)
            + f" | {first['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def query_curve_png(rows: pl.DataFrame) -> bytes | None:
    """mAP(L) against the number of train queries (the queries axis and the defaults); None before two points."""
    curve = summary(rows.filter(pl.col("axis").is_in(["queries", "defaults"]))).sort("train_queries")
    if curve["train_queries"].n_unique() < 2:
        return None
    series = {f"L={level}": group["map"].to_list() for (level,), group in curve.group_by("L", maintain_order=True)}
    x = sorted(curve["train_queries"].unique().to_list())
    return plots.line_plot_png(series, "student mAP vs training queries", "train queries", "mAP", x=x, log_x=True)


def arms_chart_png(rows: pl.DataFrame) -> bytes:
    """Every arm's mean mAP at the middle level, with half its seed spread as the error bar."""
    table = summary(rows)
    levels = sorted(table["L"].unique().to_list())
    middle = table.filter(pl.col("L") == levels[len(levels) // 2])
    return plots.horizontal_bars_png(
        dict(zip(middle["arm"], middle["map"], strict=True)),
        dict(zip(middle["arm"], middle["seed_spread"] / 2, strict=True)),
        f"student study: mAP({levels[len(levels) // 2]}) per arm, mean over seeds",
        "mAP",
    )
