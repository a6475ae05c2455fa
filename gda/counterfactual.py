"""Counterfactual leave-k-out evaluation (method.md, "Evaluation"): remove a method's top-k training images,
retrain the model from scratch with the same recipe and seed, and measure what the query lost.

ΔL = L(ẑ, θ−k) − L(ẑ, θ0) on the exact generated sample ẑ, with fixed draws (higher: the removed images
mattered to the query), and the pixel MSE between the query image and θ−k's generation of the same prompt
from the same seed. The reduced training set keeps θ0's row order with the removed rows dropped, so
removing nothing reproduces θ0 bit for bit: the removal is the only difference.

The evaluation runs as cells, one per (method, k, group of test queries); each cell retrains once per query
(`evaluate_cell`, the whole of one `counterfactual_eval` partition on a home).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from gda import evaluation, layout, plots, tables

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
from gda.diffusion.data import load_corpus_images
from gda.diffusion.sample import decode
from gda.embedder import load_embedder
from gda.model_card import ModelCard, corpus_fingerprint, read_card
from gda.queries import load_generated
from gda.registry import open_model
from gda.retrieval_metrics import mean_and_standard_error
from gda.store import Store


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


def query_loss(bundle: DiffusionBundle, query: Query, n_draws: int, seed: int) -> float:
    """L(ẑ, θ) averaged over draws 0..n_draws-1 of (seed, query id): the same draws for every model."""
    losses = evaluate_loss(
        bundle,
        query.sample[None],
        query.prompt_states[None],
        [query.query_id],
        range(n_draws),
        seed,
    )
    return float(losses[0])


def regeneration_mse(bundle: DiffusionBundle, query: Query, sampling: Mapping[str, Any]) -> float:
    """Mean squared pixel difference in [0, 1] between the query image and `bundle`'s same-seed generation."""
    regenerated = sample(bundle, [query.prompt], [query.seed], **sampling).images
    original = decode(bundle, query.sample[None].to(bundle.device))
    return float((regenerated - original).pow(2).mean())


def _removal_rankings(
    method: str,
    query_ids: list[int],
    teacher_rankings: Mapping[int, np.ndarray],
    store: Store,
    features: evaluation.Features,
    seed: int,
) -> tuple[dict[int, np.ndarray], str | None]:
    """Each query's ranking of the training set by `method` (best first), and the embedder version if one
    ranked; `seed` is the random method's."""
    if method == "teacher":
        return {q: teacher_rankings[q] for q in query_ids}, None
    train_ids, train_features = features.training()
    if method == "random":
        return evaluation.random_rankings(query_ids, train_ids, seed), None
    all_query_ids, query_features = features.queries()
    embedder = load_embedder(store.folder(layout.ATTRIBUTION_EMBEDDER))
    queries, train = evaluation.method_vectors(embedder, query_features, train_features)[method]
    rows = {int(q): i for i, q in enumerate(all_query_ids) if int(q) in query_ids}
    return evaluation.cosine_rankings(queries, train, rows, train_ids), embedder.version


def _queries(store: Store, tests: pl.DataFrame) -> list[Query]:
    """The test queries of `tests` (rows of the `test_queries` query) with their exact generated samples and
    prompt states."""
    out = []
    for (batch,), group in tests.group_by("batch", maintain_order=True):
        generated = load_generated(store.file(layout.GENERATED_QUERIES, batch))
        position = {q: i for i, q in enumerate(generated.query_ids.tolist())}
        for row in group.iter_rows(named=True):
            i = position[row["query_id"]]
            out.append(
                Query(row["query_id"], row["prompt"], row["seed"], generated.samples[i], generated.prompt_states[i])
            )
    return out


def _scratch_card(store: Store, rows: pl.DataFrame) -> ModelCard:
    """The card of the home's model, which must be a scratch model trained on exactly `rows`."""
    card = read_card(store.folder(layout.DIFFUSION_MODEL))
    if card.kind != "scratch":
        raise ValueError(
            "counterfactual_eval retrains the model from scratch, which a registered pretrained model cannot be; "
            "run it on a profile whose diffusion.kind is scratch"
        )
    fingerprint = corpus_fingerprint(rows["id"].to_list(), rows["sha256"].to_list(), rows["captions"].to_list())
    if fingerprint != card.corpus_fingerprint:
        raise ValueError(
            "the training images changed since the model was trained; re-materialize diffusion_model first"
        )
    return card


def evaluate_cell(
    store: Store,
    features: evaluation.Features,
    cell: Cell,
    config: evaluation.EvaluationConfig,
    device: str,
    log: Callable[[str], None],
) -> pl.DataFrame:
    """The rows of eval_counterfactual for `cell`: per test query of its group, θ0 retrained on `device`
    without the cell method's top k, the query's loss before and after, and how its same-seed regeneration
    moved. `log` hears one line per retrained model."""
    rows = store.tables.named("corpus_for_training")
    card = _scratch_card(store, rows)
    teacher_rankings = evaluation.teacher_rankings(store)
    tests = store.tables.named("test_queries").filter(pl.col("query_id").is_in(list(teacher_rankings)))
    query_ids = group_queries(
        tests["query_id"].to_list(), config.counterfactual_queries, config.counterfactual_group_size, cell.group
    )
    tests = tests.filter(pl.col("query_id").is_in(query_ids))
    rankings, embedder_version = _removal_rankings(
        cell.method, query_ids, teacher_rankings, store, features, config.seed
    )
    model_config = ScratchModelConfig(**card.model_config)
    data = TrainingSet(
        rows["id"].to_numpy(),
        load_corpus_images(rows, store.shard_path, model_config.sample_size),
        rows["captions"].to_list(),
    )
    original, _ = open_model(store.folder(layout.DIFFUSION_MODEL), device)
    sampling = {
        row["query_id"]: row
        for row in tests.select("query_id", "steps", "guidance_scale", "guidance_rescale").iter_rows(named=True)
    }
    measured = []
    for query in _queries(store, tests):
        removed = top_k(rankings[query.query_id], cell.k)
        retrained, result = retrain(model_config, card.training, data.without(removed), device)
        log(f"query {query.query_id}: retrained without {cell.method}'s top {cell.k} in {result.seconds:.0f} s")
        settings = {name: sampling[query.query_id][name] for name in ("steps", "guidance_scale", "guidance_rescale")}
        before = query_loss(original, query, config.loss_draws, config.loss_seed)
        after = query_loss(retrained, query, config.loss_draws, config.loss_seed)
        measured.append(
            {
                "query_id": query.query_id,
                "removed_ids": removed.tolist(),
                "n_train": len(data.ids) - len(removed),
                "loss_before": before,
                "loss_after": after,
                "delta_loss": after - before,
                "pixel_mse": regeneration_mse(retrained, query, settings),
                "train_seconds": result.seconds,
            }
        )
    return tables.conform(
        "eval_counterfactual",
        pl.DataFrame(measured).with_columns(
            cell=pl.lit(cell.key),
            method=pl.lit(cell.method),
            k=pl.lit(cell.k),
            model_version=pl.lit(card.version),
            embedder_version=pl.lit(embedder_version, dtype=pl.String),
        ),
    )


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


def summary_chart(table: pl.DataFrame) -> bytes:
    """`summary` as a PNG: ΔL per method, grouped by k, with standard errors."""
    return plots.grouped_bars_png(
        evaluation.by_level(table, "delta_loss", "k"),
        evaluation.by_level(table, "delta_loss_se", "k"),
        "loss increase of the query after removing each method's top k",
        "ΔL",
    )
