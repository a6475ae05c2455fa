"""The teacher's scores of one query batch of a home (the rows of ``abu_scores``), and how well other
teachers agree with them on a few of its queries (the asset's agreement checks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from gda import layout, tables
from gda.agreement import (
    MODES_AGREE,
    MODES_AGREE_MIN_SPEARMAN,
    RESEED_OFFSET,
    RESEEDED_AGREE,
    RESEEDED_MIN_SPEARMAN,
    AgreementCheck,
    agreement,
)
from gda.arrays import IdArray
from gda.diffusion.bundle import DiffusionBundle
from gda.model_card import ModelCard, weights_version
from gda.store import Store
from gda.teacher import QueryBatch, Teacher, TeacherConfig, restrict, score_rows, select_queries
from gda.teacher_data import candidate_batch, open_teacher
from gda.unlearning import UnlearningStep


@dataclass(frozen=True)
class BatchScores:
    frame: pl.DataFrame  # the batch's rows of abu_scores
    queries: int
    candidates_per_query: int | str  # the count, or every distinct count where queries differ
    eta_median: float  # of the queries' unlearning step sizes
    checks: list[AgreementCheck]


def score_batch(
    bundle: DiffusionBundle,
    card: ModelCard,
    store: Store,
    config: TeacherConfig,
    baselines: Mapping[str, IdArray],
    batch_key: str,
) -> BatchScores:
    """AbU+ scores of every query of ``batch_key`` against its DINO candidates, or, in first-order mode for a
    batch of ``config.full_ranking_splits`` queries, against every training image of the shards of
    ``baselines`` (each shard's ``baseline_losses``)."""
    model = open_teacher(bundle, store, config, sorted(baselines), baselines.values())
    batch = candidate_batch(store, batch_key)
    dino = batch.candidates
    splits = set(store.tables.named("batch_splits", [batch_key])["split"].to_list())
    if config.mode == "first_order" and splits <= set(config.full_ranking_splits):
        batch = model.whole_training_set(batch)
    steps = model.deltas(batch)
    scores = model.scores(steps, batch)
    frame = tables.conform(
        "abu_scores",
        score_rows(scores, batch).with_columns(
            batch=pl.lit(batch_key),
            mode=pl.lit(config.mode),
            model_version=pl.lit(card.version),
            factors_version=pl.lit(weights_version(store.folder(layout.EKFAC_FACTORS))),
            config_hash=pl.lit(config.digest()),
        ),
    )
    n_candidates = sorted({len(ids) for ids in batch.candidates.values()})
    return BatchScores(
        frame,
        len(batch.query_ids),
        n_candidates[0] if len(n_candidates) == 1 else str(n_candidates),
        float(np.median([step.eta for step in steps])),
        _agreement_checks(model, batch, steps, scores, dino),
    )


def _agreement_checks(
    model: Teacher,
    batch: QueryBatch,
    steps: Sequence[UnlearningStep],
    scores: dict[int, np.ndarray],
    dino: dict[int, list[int]],
) -> list[AgreementCheck]:
    """Recompute the scores of the batch's first ``agreement_queries`` queries with the other mode and with
    another query-draw seed, on their nearest ``agreement_candidates`` DINO candidates, and say how well each
    agrees with the stored teacher."""
    config = model.config
    chosen = batch.query_ids[: config.agreement_queries]
    rows = [batch.query_ids.index(q) for q in chosen]
    nearest = {q: ids[: config.agreement_candidates] for q, ids in dino.items()}
    subset = select_queries(QueryBatch(batch.query_ids, batch.samples, batch.prompt_states, nearest), chosen)
    stored = restrict(scores, batch, subset.candidates)
    other_mode = "finite" if config.mode == "first_order" else "first_order"
    reseed = config.seed + RESEED_OFFSET
    compared = [
        (
            MODES_AGREE,
            MODES_AGREE_MIN_SPEARMAN,
            f"{config.mode} vs {other_mode}",
            model.scores([steps[r] for r in rows], subset, other_mode),
        ),
        (
            RESEEDED_AGREE,
            RESEEDED_MIN_SPEARMAN,
            f"query draws seeded {config.seed} vs {reseed}",
            model.scores(model.deltas(subset, reseed), subset),
        ),
    ]
    return [
        AgreementCheck(name, threshold, what, len(next(iter(other.values()))), agreement(stored, other).summary())
        for name, threshold, what, other in compared
    ]
