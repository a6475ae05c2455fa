"""The AbU+ teacher for a batch of generated queries: unlearn each query with one EK-FAC Newton step and
score its candidates by the change of their loss (finite) or its linearisation (first order)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import polars as pl
import torch
from torch import nn

from gda import ekfac, unlearning
from gda.diffusion.bundle import DiffusionBundle
from gda.diffusion.loss import scoring_timesteps

MODES = ("first_order", "finite")


@dataclass(frozen=True)
class TeacherConfig:
    """Every teacher setting (``resources.TeacherSettings`` documents each; its ``config()`` makes this)."""

    k_candidates: int  # DINO nearest neighbours scored per query
    n_negatives: int  # random non-candidates kept per query for the student
    seed: int  # of the scoring and query draws
    modules: str  # parameters the unlearning step moves (gda.ekfac.select_modules)
    fisher_draws: int  # fixed draws per training image for the EK-FAC fit
    damping_factor: float
    batch_size: int
    mode: str  # "first_order" | "finite"
    full_ranking_splits: Sequence[str]  # query splits the first-order teacher ranks against every training image
    agreement_queries: int  # queries per batch that the agreement checks recompute
    agreement_candidates: int  # ... on their nearest this many DINO candidates
    relative_step: float
    query_draws: int
    scoring_timesteps: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"teacher mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    def digest(self) -> str:
        """12 hex digits that change with any setting (abu_scores.config_hash)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class QueryBatch:
    query_ids: list[int]
    samples: torch.Tensor  # exact generated samples
    prompt_states: torch.Tensor
    candidates: dict[int, list[int]]  # query id -> candidate train ids, nearest first


# train ids -> (their images, prompt states, baseline losses), for the finite teacher
FiniteItems = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def timesteps(config: TeacherConfig) -> list[int]:
    return scoring_timesteps(config.scoring_timesteps)


def unlearning_deltas(
    bundle: DiffusionBundle,
    modules: Mapping[str, nn.Module],
    factors: ekfac.EkfacFactors,
    batch: QueryBatch,
    config: TeacherConfig,
    query_seed: int | None = None,
) -> list[unlearning.UnlearningStep]:
    """One unlearning step per query, all queries' gradients in shared passes; the draws come from
    ``query_seed`` (default: the config's seed)."""
    seed = config.seed if query_seed is None else query_seed
    grads = unlearning.query_gradients(
        bundle, modules, batch.samples, batch.prompt_states, batch.query_ids, config.query_draws, seed
    )
    return unlearning.unlearning_steps(factors, grads, config.relative_step, modules, config.damping_factor)


def first_order_scores(
    side: unlearning.TrainingSide, steps: Sequence[unlearning.UnlearningStep], batch: QueryBatch
) -> dict[int, np.ndarray]:
    """τ ≈ ⟨∇L(z), Δ⟩ of each query's candidates, from the stored training-side gradients."""
    union = sorted({item for ids in batch.candidates.values() for item in ids})
    subset = unlearning.select_items(side, union)
    scores = unlearning.first_order_scores_fast(subset, unlearning.stack_deltas([s.delta for s in steps]))
    column = {item: position for position, item in enumerate(union)}
    return {
        query_id: scores[row, [column[item] for item in batch.candidates[query_id]]].double().numpy()
        for row, query_id in enumerate(batch.query_ids)
    }


def finite_scores(
    bundle: DiffusionBundle,
    modules: Mapping[str, nn.Module],
    steps: Sequence[unlearning.UnlearningStep],
    batch: QueryBatch,
    items: FiniteItems,
    config: TeacherConfig,
) -> dict[int, np.ndarray]:
    """τ = L(z, θ′) − L(z, θ0) of each query's candidates; ``items(ids)`` gives (images, prompt states,
    baseline losses) of those training images."""
    out = {}
    for step, query_id in zip(steps, batch.query_ids, strict=True):
        ids = batch.candidates[query_id]
        images, states, baseline = items(ids)
        scores = unlearning.finite_scores(
            bundle,
            modules,
            step.delta,
            images,
            states,
            ids,
            config.seed,
            baseline,
            timesteps(config),
            config.batch_size,
        )
        out[query_id] = scores.double().numpy()
    return out


def score_rows(scores: dict[int, np.ndarray], batch: QueryBatch) -> pl.DataFrame:
    """One row per (query, candidate): score and rank (0 = highest τ, ties to the lower train id)."""
    frames = []
    for query_id, values in scores.items():
        ids = batch.candidates[query_id]
        ranks = unlearning.rank_scores(torch.from_numpy(values), ids).numpy()
        frames.append(
            pl.DataFrame(
                {
                    "query_id": query_id,
                    "train_id": np.asarray(ids, dtype=np.int64),
                    "score": values,
                    "rank": ranks.astype(np.int32),
                    "n_candidates": len(ids),
                }
            )
        )
    return pl.concat(frames)


@dataclass
class Teacher:
    """AbU+ for query batches in either mode. The training-side data each mode needs (stored G_z for first
    order; images, prompt states and baseline losses for finite) is loaded on first use only, so a check
    that compares the modes costs nothing unless it runs."""

    bundle: DiffusionBundle
    modules: Mapping[str, nn.Module]
    factors: ekfac.EkfacFactors
    config: TeacherConfig
    load_side: Callable[[], unlearning.TrainingSide] = field(repr=False)
    finite_items: FiniteItems = field(repr=False)

    @cached_property
    def side(self) -> unlearning.TrainingSide:
        return self.load_side()

    def deltas(self, batch: QueryBatch, query_seed: int | None = None) -> list[unlearning.UnlearningStep]:
        return unlearning_deltas(self.bundle, self.modules, self.factors, batch, self.config, query_seed)

    def scores(
        self, steps: Sequence[unlearning.UnlearningStep], batch: QueryBatch, mode: str | None = None
    ) -> dict[int, np.ndarray]:
        mode = mode or self.config.mode
        if mode == "first_order":
            return first_order_scores(self.side, steps, batch)
        if mode == "finite":
            return finite_scores(self.bundle, self.modules, steps, batch, self.finite_items, self.config)
        raise ValueError(f"teacher mode must be one of {', '.join(MODES)}, got {mode!r}")

    def whole_training_set(self, batch: QueryBatch) -> QueryBatch:
        """The batch with every training image as every query's candidate: first order scores them all for
        about the cost of the candidates, so evaluation queries get full rankings (no candidate-recall limit)."""
        every = sorted(self.side.item_ids)
        return QueryBatch(batch.query_ids, batch.samples, batch.prompt_states, {q: every for q in batch.query_ids})


def select_queries(batch: QueryBatch, query_ids: Sequence[int]) -> QueryBatch:
    rows = [batch.query_ids.index(q) for q in query_ids]
    return QueryBatch(
        list(query_ids), batch.samples[rows], batch.prompt_states[rows], {q: batch.candidates[q] for q in query_ids}
    )


def restrict(
    scores: dict[int, np.ndarray], batch: QueryBatch, candidates: Mapping[int, Sequence[int]]
) -> dict[int, np.ndarray]:
    """Scores of ``batch`` (one array per query, in its candidate order) on the ``candidates`` subsets."""
    out = {}
    for query_id, ids in candidates.items():
        position = {item: i for i, item in enumerate(batch.candidates[query_id])}
        out[query_id] = scores[query_id][[position[item] for item in ids]]
    return out
