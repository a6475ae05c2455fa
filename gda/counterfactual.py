"""Counterfactual leave-k-out evaluation (method.md, "Evaluation"): remove a method's top-k training images,
retrain the model from scratch with the same recipe and seed, and measure what the query lost.

ΔL = L(ẑ, θ−k) − L(ẑ, θ0) on the exact generated sample ẑ, with fixed draws (higher: the removed images
mattered to the query), and the pixel MSE between the query image and θ−k's generation of the same prompt
from the same seed. The reduced training set keeps θ0's row order with the removed rows dropped, so
removing nothing reproduces θ0 bit for bit: the removal is the only difference.

The evaluation runs as cells, one per (method, k, group of test queries); each cell retrains once per query.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

# The cell plan is part of this module's interface: gda_assets and the tests use it from here.
from gda.counterfactual_cells import METHODS, Cell, cells, group_queries  # noqa: F401
from gda.diffusion import (
    DiffusionBundle,
    ScratchModelConfig,
    TrainResult,
    build_from_scratch,
    evaluate_loss,
    sample,
    train,
)
from gda.diffusion.sample import decode
from gda.retrieval_metrics import mean_and_standard_error


def top_k(ranking: np.ndarray, k: int) -> np.ndarray:
    if len(ranking) < k:
        raise ValueError(f"a ranking of {len(ranking)} training images has no top {k}")
    return np.asarray(ranking[:k])


@dataclass(frozen=True)
class TrainingSet:
    """What θ0 trained on, in its order: ids (N,), images (N, 3, H, W) in [-1, 1], captions per image."""

    ids: np.ndarray
    images: torch.Tensor
    captions: list[list[str]]

    def without(self, removed: Sequence[int]) -> TrainingSet:
        """The same set, in the same order, without `removed` (every one of which must be in the set)."""
        removed = np.asarray(removed, dtype=np.int64)
        missing = np.setdiff1d(removed, self.ids)
        if missing.size:
            raise ValueError(f"{missing.size} ids to remove are not in the training set, e.g. {int(missing[0])}")
        keep = ~np.isin(self.ids, removed)
        rows = torch.from_numpy(np.flatnonzero(keep))
        return TrainingSet(
            self.ids[keep], self.images[rows], [c for c, k in zip(self.captions, keep, strict=True) if k]
        )


def retrain(
    config: ScratchModelConfig, training: Mapping[str, Any], data: TrainingSet, device: str = "cpu"
) -> tuple[DiffusionBundle, TrainResult]:
    """A model built and trained from scratch on `data` with θ0's architecture and recipe (its model card's)."""
    bundle = build_from_scratch(config).to(device)
    return bundle, train(bundle, data.images, data.captions, **training)


@dataclass(frozen=True)
class Query:
    query_id: int
    prompt: str
    seed: int  # the sampling seed that generated it
    sample: torch.Tensor  # the exact generated model-space sample, (C, H, W)
    prompt_states: torch.Tensor  # (tokens, dim), as used for generation


def query_loss(bundle: DiffusionBundle, query: Query, n_draws: int, seed: int, snr_gamma: float | None) -> float:
    """L(ẑ, θ) averaged over draws 0..n_draws-1 of (seed, query id): the same draws for every model."""
    losses = evaluate_loss(
        bundle,
        query.sample[None],
        query.prompt_states[None],
        [query.query_id],
        range(n_draws),
        seed,
        snr_gamma=snr_gamma,
    )
    return float(losses[0])


def regeneration_mse(bundle: DiffusionBundle, query: Query, sampling: Mapping[str, Any]) -> float:
    """Mean squared pixel difference in [0, 1] between the query image and `bundle`'s same-seed generation."""
    regenerated = sample(bundle, [query.prompt], [query.seed], **sampling).images
    original = decode(bundle, query.sample[None].to(bundle.device))
    return float((regenerated - original).pow(2).mean())


def summary(rows: pl.DataFrame) -> pl.DataFrame:
    """Per (method, k): queries, ΔL and pixel MSE mean ± standard error, and ΔL minus random's ΔL on the
    same queries (paired, so the spread between queries cancels), where random ran on them."""
    random = rows.filter(pl.col("method") == "random").select(
        "k", "query_id", pl.col("delta_loss").alias("random_delta")
    )
    paired = rows.join(random, on=["k", "query_id"], how="left")
    out = []
    for (method, k), group in paired.group_by("method", "k", maintain_order=True):
        delta, delta_se = mean_and_standard_error(group["delta_loss"].to_numpy())
        mse, mse_se = mean_and_standard_error(group["pixel_mse"].to_numpy())
        differences = (group["delta_loss"] - group["random_delta"]).drop_nulls().to_numpy()
        gain, gain_se = mean_and_standard_error(differences) if differences.size else (math.nan, math.nan)
        out.append(
            {
                "method": method,
                "k": k,
                "n_queries": group.height,
                "delta_loss": delta,
                "delta_loss_se": delta_se,
                "over_random": gain,
                "over_random_se": gain_se,
                "pixel_mse": mse,
                "pixel_mse_se": mse_se,
            }
        )
    order = {m: i for i, m in enumerate(METHODS)}
    return pl.DataFrame(out).sort(pl.col("k"), pl.col("method").replace_strict(order, default=len(order)))


def markdown_table(table: pl.DataFrame) -> str:
    """`summary` for people; ΔL in units of 1e-3, as the paper reports it."""
    lines = [
        "| method | k | queries | ΔL ×1e-3 | ΔL − random ×1e-3 (paired) | pixel MSE ×1e-3 |",
        "|---|---|---|---|---|---|",
    ]
    for row in table.iter_rows(named=True):
        values = [
            _with_error(row[name] * 1e3, row[name + "_se"] * 1e3) for name in ("delta_loss", "over_random", "pixel_mse")
        ]
        lines.append(f"| {row['method']} | {row['k']} | {row['n_queries']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _with_error(value: float, error: float) -> str:
    """`value ± error`, or the value alone where one query gives no standard error."""
    return f"{value:.3f} ± {error:.3f}" if math.isfinite(error) else f"{value:.3f}"
