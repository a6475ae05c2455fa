"""Rank evaluation: how well each method reproduces the teacher's ranking of held-out test queries.

Every method ranks the same set as the teacher (for the demo, every training image) by cosine between a
query vector and training vectors; mAP(L) then takes the teacher's top L as positives (`retrieval_metrics`).
Methods (the names stored in `eval_rank.method`): `random` (a seeded permutation per query), `image`,
`text`, `concat_raw` (the two parts, each L2-normalised, concatenated: the student's input without the
student), `distilled` (the embedder), and `teacher_reseeded`, the teacher itself with other query draws,
whose ranking is given, not computed here: the ceiling no student trained on this teacher can pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from gda.embedder import Embedder
from gda.retrieval_metrics import map_at

METHODS = ("random", "image", "text", "concat_raw", "distilled", "teacher_reseeded")


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
