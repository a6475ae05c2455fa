"""DINO kNN candidates: for each query, the K training images nearest by image-feature cosine (the only
ones the teacher scores), plus a random sample of non-candidates kept as negatives for the student."""

from __future__ import annotations

import numpy as np
import polars as pl

from gda import index


def candidates(
    train_ids: np.ndarray,
    train_vectors: np.ndarray,
    query_ids: np.ndarray,
    query_vectors: np.ndarray,
    k: int,
    n_negatives: int,
    seed: int,
    settings: index.SearchSettings = index.SearchSettings(),
) -> pl.DataFrame:
    """Rows of ``dino_candidates`` (without the batch column): kind ``candidate`` with rank 0..K-1 by
    similarity, and kind ``negative`` with rank -1, drawn per query from (seed, query id) alone."""
    if n_negatives < 0:
        raise ValueError(f"n_negatives must be >= 0, got {n_negatives}")
    found, similarity = index.search(index.build(train_ids, train_vectors, settings), query_vectors, k)
    frames = []
    for row, query_id in enumerate(query_ids.tolist()):
        chosen = found[row][found[row] >= 0]
        frames.append(
            pl.DataFrame(
                {
                    "query_id": query_id,
                    "train_id": chosen,
                    "rank": np.arange(len(chosen), dtype=np.int32),
                    "similarity": similarity[row][: len(chosen)].astype(np.float64),
                    "kind": "candidate",
                }
            )
        )
        outside = np.setdiff1d(train_ids, chosen, assume_unique=False)
        rng = np.random.default_rng([seed, query_id])
        negatives = rng.choice(outside, size=min(n_negatives, len(outside)), replace=False) if len(outside) else outside
        frames.append(
            pl.DataFrame(
                {
                    "query_id": query_id,
                    "train_id": np.sort(negatives).astype(np.int64),
                    "rank": np.full(len(negatives), -1, dtype=np.int32),
                    "similarity": pl.Series([None] * len(negatives), dtype=pl.Float64),
                    "kind": "negative",
                }
            )
        )
    return pl.concat(frames, how="vertical_relaxed")
