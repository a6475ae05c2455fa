"""Rank evaluation: how well each method reproduces the teacher's ranking of held-out test queries.

Every method ranks the same set as the teacher (for the demo, every training image) by cosine between a
query vector and training vectors; mAP(L) then takes the teacher's top L as positives (`retrieval_metrics`).
Methods (the names stored in `eval_rank.method`): `random` (a seeded permutation per query), `image`,
`text`, `concat_raw` (the two parts, each L2-normalised, concatenated: the student's input without the
student), `distilled` (the embedder), and `teacher_reseeded`, the teacher itself with other query draws:
the ceiling no student trained on this teacher can pass. `rank_evaluation` is the whole of `rank_eval` on a
home: the table, its chart and galleries of the top attributions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from PIL import Image

from gda import layout, plots, tables
from gda.agreement import RESEED_OFFSET
from gda.arrays import IdArray
from gda.corpus.shards import load_images
from gda.embedder import Embedder, load_embedder
from gda.queries import load_generated
from gda.registry import open_model
from gda.retrieval_metrics import map_at
from gda.store import Store
from gda.student import feature_matrix
from gda.student_guard import StudentGuard, shortfalls
from gda.teacher import QueryBatch, Teacher, TeacherConfig, select_queries
from gda.teacher_data import open_teacher
from gda.unlearning import rank_scores

METHODS = ("random", "image", "text", "concat_raw", "distilled", "teacher_reseeded")


@dataclass(frozen=True)
class EvaluationConfig:
    """Every evaluation setting (``resources.EvaluationSettings`` documents each; its ``config()`` makes this)."""

    l_fractions: Sequence[float]  # mAP levels L as fractions of the training set
    seed: int  # of the random baseline's permutations
    gallery_queries: int
    gallery_top_k: int
    counterfactual_methods: Sequence[str]
    counterfactual_k: Sequence[int]
    counterfactual_queries: int  # the first n test queries by id
    counterfactual_group_size: int
    loss_draws: int  # fixed draws of the query loss before and after removal
    loss_seed: int


@dataclass(frozen=True)
class Features:
    """The feature arrays of the training images and of the queries, per partition."""

    image: Mapping[str, IdArray]
    text: Mapping[str, IdArray]
    query_image: Mapping[str, IdArray]
    query_text: Mapping[str, IdArray]

    def training(self) -> tuple[np.ndarray, np.ndarray]:
        return feature_matrix(self.image, self.text)

    def queries(self) -> tuple[np.ndarray, np.ndarray]:
        return feature_matrix(self.query_image, self.query_text)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def method_vectors(
    embedder: Embedder, query_features: np.ndarray, train_features: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(query vectors, training vectors) per feature method; the features are concat(image, text) rows."""
    cut = embedder.config.image_dim
    image = (_unit(query_features[:, :cut]), _unit(train_features[:, :cut]))
    text = (_unit(query_features[:, cut:]), _unit(train_features[:, cut:]))
    return {
        "image": image,
        "text": text,
        "concat_raw": (np.concatenate([image[0], text[0]], axis=1), np.concatenate([image[1], text[1]], axis=1)),
        "distilled": (embedder.embed_queries(query_features), embedder.embed_training(train_features)),
    }


def cosine_rankings(
    query_vectors: np.ndarray, train_vectors: np.ndarray, query_rows: Mapping[int, int], train_ids: np.ndarray
) -> dict[int, np.ndarray]:
    """Per query id, every training id by descending inner product (ties: the lower row first)."""
    return {
        query_id: train_ids[np.argsort(-(train_vectors @ query_vectors[row]), kind="stable")]
        for query_id, row in query_rows.items()
    }


def random_rankings(query_ids: Sequence[int], train_ids: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {query_id: rng.permutation(train_ids) for query_id in query_ids}


def restrict(rankings: Mapping[int, np.ndarray], teacher: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each ranking cut to the teacher's ranked set of its query, order kept (no-op for whole-set rankings)."""
    out = {}
    for query_id, ranking in rankings.items():
        allowed = teacher[query_id]
        out[query_id] = ranking if len(ranking) == len(allowed) else ranking[np.isin(ranking, allowed)]
    return out


def rank_table(
    teacher: Mapping[int, np.ndarray], rankings: Mapping[str, Mapping[int, np.ndarray]], levels: Sequence[int]
) -> pl.DataFrame:
    """One row per (method, L): mAP, its standard error over queries, and the number of queries."""
    rows = []
    for method, ranking in rankings.items():
        for level in levels:
            result = map_at(teacher, ranking, level)
            rows.append(
                {
                    "method": method,
                    "L": level,
                    "map": result.mean,
                    "se": result.standard_error,
                    "n_queries": result.n_queries,
                }
            )
    return pl.DataFrame(
        rows, schema={"method": pl.String, "L": pl.Int32, "map": pl.Float64, "se": pl.Float64, "n_queries": pl.Int32}
    )


def levels_for(n_train: int, fractions: Sequence[float]) -> list[int]:
    """mAP levels L as fractions of the training set (the paper's 500/1000/4000 of 118k are 0.4/0.85/3.4%)."""
    return sorted({max(1, round(f * n_train)) for f in fractions})


def markdown_table(table: pl.DataFrame) -> str:
    levels = sorted(table["L"].unique().to_list())
    lines = ["| method | " + " | ".join(f"mAP({level})" for level in levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for method in [m for m in METHODS if m in set(table["method"])]:
        cells = []
        for level in levels:
            row = table.filter((pl.col("method") == method) & (pl.col("L") == level)).row(0, named=True)
            cells.append(f"{row['map']:.3f} ± {row['se']:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_level(table: pl.DataFrame, column: str, level: str = "L") -> dict[str, dict[str, float]]:
    """{"L=10": {method: value}} for a grouped bar chart: one group per value of the `level` column."""
    return {
        f"{level}={value}": dict(zip(group["method"], group[column], strict=True))
        for (value,), group in table.sort(level).group_by(level, maintain_order=True)
    }


def teacher_rankings(store: Store) -> dict[int, np.ndarray]:
    """The teacher's ranking of each test query, best first: what every method is measured against."""
    stored = store.tables.named("test_rankings")
    if stored.is_empty():
        raise ValueError("no teacher scores for test queries; materialize abu_scores for the test batches")
    return {q: g["train_id"].to_numpy() for (q,), g in stored.group_by("query_id", maintain_order=True)}


def _reseeded_rankings(teacher: Teacher, store: Store, rankings: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The teacher's rankings of the same sets with other query draws: the ceiling for any student."""
    batches = store.tables.query("SELECT DISTINCT batch FROM query_prompts WHERE split = 'test' ORDER BY batch")
    out = {}
    for batch_key in batches["batch"]:
        generated = load_generated(store.file(layout.GENERATED_QUERIES, batch_key))
        ids = [q for q in generated.query_ids.tolist() if q in rankings]
        sets = {q: sorted(rankings[q].tolist()) for q in ids}
        every = QueryBatch(
            generated.query_ids.tolist(),
            generated.samples,
            generated.prompt_states,
            {q: sets.get(q, []) for q in generated.query_ids.tolist()},
        )
        batch = select_queries(every, ids)
        scores = teacher.scores(teacher.deltas(batch, teacher.config.seed + RESEED_OFFSET), batch)
        for query_id, values in scores.items():
            order = np.argsort(rank_scores(torch.from_numpy(values), sets[query_id]).numpy())
            out[query_id] = np.asarray(sets[query_id])[order]
    return out


def _gallery_png(
    store: Store,
    teacher: Mapping[int, np.ndarray],
    distilled: Mapping[int, np.ndarray],
    queries: pl.DataFrame,
    top_k: int,
) -> bytes:
    """Per query of ``queries`` (query_id, prompt, image_path) two rows: the generated image then the
    teacher's top k, and again with the distilled top k."""
    images, labels = [], []
    for query_id, prompt, image_path in queries.iter_rows():
        generated = np.asarray(Image.open(store.artifacts / image_path).convert("RGB"))
        for name, ranking in (("teacher", teacher), ("distilled", distilled)):
            rows = store.training_rows(ranking[query_id][:top_k].tolist())
            pictures = {}
            for (shard,), group in rows.group_by("shard"):
                pictures |= dict(
                    zip(group["id"], load_images(store.shard_path(shard), group["key"].to_list()), strict=True)
                )
            images.append(generated)
            labels.append(f"query {query_id}: {prompt}")
            for rank, (train_id, captions) in enumerate(zip(rows["id"], rows["captions"], strict=True), start=1):
                images.append(np.asarray(pictures[train_id].convert("RGB")))
                labels.append(f"{name} #{rank}: {captions[0]}")
    return plots.image_grid_png(
        images, labels, columns=top_k + 1, title="top attributions: teacher (AbU+) vs distilled"
    )


@dataclass(frozen=True)
class RankEvaluation:
    frame: pl.DataFrame  # the rows of eval_rank
    markdown: str  # the table for people
    chart: bytes  # PNG: mAP(L) per method and level
    gallery: bytes  # PNG: the top attributions of the first test queries, teacher vs distilled
    middle_level: int
    distilled_over_concat_raw: float  # mAP at the middle level
    guard: StudentGuard
    test_queries: int
    embedder_version: str


def rank_evaluation(
    store: Store,
    features: Features,
    teacher_config: TeacherConfig,
    config: EvaluationConfig,
    baselines: Mapping[str, IdArray],
    device: str,
) -> RankEvaluation:
    """mAP(L) of every method against the teacher's ranking of each test query (the same ranked set for every
    method), the teacher with other query draws opened on ``device`` over the training side of the shards of
    ``baselines`` (each shard's ``baseline_losses``)."""
    teacher = teacher_rankings(store)
    train_ids, train_features = features.training()
    query_ids, query_features = features.queries()
    embedder = load_embedder(store.folder(layout.ATTRIBUTION_EMBEDDER))
    rows = {int(q): i for i, q in enumerate(query_ids) if int(q) in teacher}
    rankings = {"random": random_rankings(list(teacher), train_ids, config.seed)}
    for method, (queries, train) in method_vectors(embedder, query_features, train_features).items():
        rankings[method] = cosine_rankings(queries, train, rows, train_ids)
    bundle, _ = open_model(store.folder(layout.DIFFUSION_MODEL), device)
    rankings["teacher_reseeded"] = _reseeded_rankings(
        open_teacher(bundle, store, teacher_config, sorted(baselines), baselines.values()), store, teacher
    )
    rankings = {method: restrict(ranking, teacher) for method, ranking in rankings.items()}
    levels = levels_for(len(train_ids), config.l_fractions)
    table = rank_table(teacher, rankings, levels).with_columns(embedder_version=pl.lit(embedder.version))
    chart = plots.grouped_bars_png(by_level(table, "map"), by_level(table, "se"), "mAP(L) against the teacher", "mAP")
    middle = levels[len(levels) // 2]
    distilled = table.filter((pl.col("method") == "distilled") & (pl.col("L") == middle))["map"][0]
    raw = table.filter((pl.col("method") == "concat_raw") & (pl.col("L") == middle))["map"][0]
    shown = store.tables.named("test_queries").select("query_id", "prompt", "image_path").head(config.gallery_queries)
    return RankEvaluation(
        frame=tables.conform("eval_rank", table),
        markdown=markdown_table(table),
        chart=chart,
        gallery=_gallery_png(store, teacher, rankings["distilled"], shown, config.gallery_top_k),
        middle_level=middle,
        distilled_over_concat_raw=distilled / raw if raw > 0 else math.nan,
        guard=StudentGuard(shortfalls(table)),
        test_queries=len(teacher),
        embedder_version=embedder.version,
    )
