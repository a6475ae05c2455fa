"""The AbU+ teacher for a batch of generated queries: unlearn each query with one EK-FAC Newton step and
score its candidates by the change of their loss (finite) or its linearisation (first order)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import nn

from gda import ekfac, unlearning
from gda.diffusion.bundle import DiffusionBundle
from gda.diffusion.loss import scoring_timesteps


@dataclass(frozen=True)
class TeacherConfig:
    mode: str  # "first_order" | "finite"
    relative_step: float
    query_draws: int
    scoring_timesteps: int
    damping_factor: float
    seed: int
    batch_size: int


@dataclass(frozen=True)
class QueryBatch:
    query_ids: list[int]
    samples: torch.Tensor  # exact generated samples
    prompt_states: torch.Tensor
    candidates: dict[int, list[int]]  # query id -> candidate train ids, nearest first


def timesteps(config: TeacherConfig) -> list[int]:
    return scoring_timesteps(config.scoring_timesteps)


def unlearning_deltas(
    bundle: DiffusionBundle, modules: Mapping[str, nn.Module], factors: ekfac.EkfacFactors, batch: QueryBatch, config: TeacherConfig
) -> list[unlearning.UnlearningStep]:
    steps = []
    for row, query_id in enumerate(batch.query_ids):
        grad = unlearning.query_gradient(
            bundle, modules, batch.samples[row], batch.prompt_states[row], query_id, config.query_draws, config.seed
        )
        steps.append(unlearning.unlearning_step(factors, grad, config.relative_step, modules, config.damping_factor))
    return steps


def first_order_scores(side: unlearning.TrainingSide, steps: Sequence[unlearning.UnlearningStep], batch: QueryBatch) -> dict[int, np.ndarray]:
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
    items: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    config: TeacherConfig,
) -> dict[int, np.ndarray]:
    """τ = L(z, θ′) − L(z, θ0) of each query's candidates; ``items(ids)`` gives (images, prompt states,
    baseline losses) of those training images."""
    out = {}
    for step, query_id in zip(steps, batch.query_ids, strict=True):
        ids = batch.candidates[query_id]
        images, states, baseline = items(ids)
        scores = unlearning.finite_scores(
            bundle, modules, step.delta, images, states, ids, config.seed, baseline, timesteps(config), config.batch_size
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
                {"query_id": query_id, "train_id": np.asarray(ids, dtype=np.int64), "score": values, "rank": ranks.astype(np.int32), "n_candidates": len(ids)}
            )
        )
    return pl.concat(frames)
