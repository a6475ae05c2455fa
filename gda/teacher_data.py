"""A home's teacher data, read through a ``gda.store.Store``: the images and prompt states of training rows,
the query-independent products (EK-FAC factors, each shard's training side and baseline losses), a query
batch with its DINO candidates, and the teacher opened over the home's model, factors and training side."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from gda import arrays, layout, unlearning
from gda.arrays import IdArray
from gda.diffusion.bundle import DiffusionBundle
from gda.diffusion.data import load_corpus_images
from gda.ekfac import DiffusionItems, fit_diffusion_factors, load_factors, save_factors, select_modules
from gda.model_card import ModelCard
from gda.queries import load_generated
from gda.registry import open_model
from gda.store import Store
from gda.teacher import FiniteItems, QueryBatch, Teacher, TeacherConfig, timesteps


def images_and_states(bundle: DiffusionBundle, store: Store, rows: pl.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``rows`` at the model's resolution and the prompt states of their first captions: the
    pairing the EK-FAC fit, the scores and the student all use."""
    images = load_corpus_images(rows, store.shard_path, bundle.image_size)
    return images, bundle.text.encode_prompts(rows["captions"].list.first().to_list())


def shard_items(bundle: DiffusionBundle, store: Store, shard: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A shard's images, first-caption prompt states and ids."""
    rows = store.tables.named("shard_training_items", [shard])
    return *images_and_states(bundle, store, rows), rows["id"].to_list()


def draw_provenance(model_version: str, config: TeacherConfig) -> dict[str, str]:
    """What fixes a training image's scoring losses: the model and the draws."""
    return {
        "model_version": model_version,
        "seed": str(config.seed),
        "timesteps": ",".join(map(str, timesteps(config))),
    }


def fit_items(
    bundle: DiffusionBundle,
    store: Store,
    rows: pl.DataFrame,
    config: TeacherConfig,
    draw_indices: Iterable[int],
) -> DiffusionItems:
    """The EK-FAC fit's items: the images of ``rows`` with their first captions, each on the fixed draws
    ``draw_indices`` of the teacher's seed, weighted as the model was trained."""
    images, states = images_and_states(bundle, store, rows)
    return DiffusionItems(
        bundle,
        images,
        states,
        rows["id"].to_list(),
        list(draw_indices),
        seed=config.seed,
        batch_size=config.batch_size,
    )


@dataclass(frozen=True)
class FactorFit:
    module_names: list[str]
    images: int
    draws: int  # per image
    seconds: float


def fit_factors(
    bundle: DiffusionBundle, card: ModelCard, store: Store, config: TeacherConfig, folder: Path
) -> FactorFit:
    """EK-FAC factors of ``config.modules`` over every training image x ``config.fisher_draws`` fixed draws,
    saved in ``folder`` in kronfluence's layout."""
    rows = store.tables.named("corpus_for_training")
    items = fit_items(bundle, store, rows, config, range(config.fisher_draws))
    started = time.perf_counter()
    factors = fit_diffusion_factors(items, config.modules)
    seconds = time.perf_counter() - started
    save_factors(factors, folder, factor_arguments={"modules": config.modules, "model_version": card.version})
    return FactorFit(list(factors.modules), len(rows), config.fisher_draws, seconds)


def write_training_side(
    bundle: DiffusionBundle, card: ModelCard, store: Store, config: TeacherConfig, shard: str, path: Path
) -> int:
    """G_z of every image of ``shard`` and both flips on the fixed scoring draws, saved to ``path`` with the
    draws' provenance (so ``shard_baselines`` can take its losses); returns the number of images."""
    images, states, ids = shard_items(bundle, store, shard)
    modules = select_modules(bundle.unet, config.modules)
    side = unlearning.training_side(
        bundle, modules, images, states, ids, config.seed, timesteps(config), config.batch_size
    )
    unlearning.save_training_side(path, side, draw_provenance(card.version, config))
    return len(ids)


@dataclass(frozen=True)
class Baselines:
    array: IdArray  # (images, 2) losses as is and flipped
    mean_loss: float
    source: str  # "training_gradients pass" | "own forward pass"


def shard_baselines(store: Store, card: ModelCard, config: TeacherConfig, shard: str, device: str) -> Baselines:
    """L(z, θ0) of every image of ``shard`` and its flip on the fixed scoring draws: the losses of the shard's
    training_gradients file when the same model and draws made it (its forward pass computed exactly these),
    else a forward pass of the model opened on ``device``."""
    rows = store.tables.named("shard_training_items", [shard])
    side = store.file(layout.TRAINING_GRADIENTS, shard)
    stored = unlearning.stored_losses(side) if side.exists() else None
    if stored is not None and stored[2] == draw_provenance(card.version, config) and stored[0] == rows["id"].to_list():
        ids, values, source = stored[0], stored[1], "training_gradients pass"
    else:
        bundle, _ = open_model(store.folder(layout.DIFFUSION_MODEL), device)
        images, states, ids = shard_items(bundle, store, shard)
        values = unlearning.baseline_losses(
            bundle, images, states, ids, config.seed, timesteps(config), config.batch_size
        )
        source = "own forward pass"
    array = IdArray(
        ids=np.asarray(ids, dtype=np.int64),
        values=values.to(torch.float32).numpy(),
        metadata={"model_version": card.version},
    )
    return Baselines(array, float(values.mean()), source)


def stored_baselines(store: Store, shards: Iterable[str]) -> list[IdArray]:
    """The ``baseline_losses`` arrays of those ``shards`` that have one, for callers outside Dagster (an asset
    declares ``baseline_losses`` as an input instead)."""
    files = [store.file(layout.BASELINE_LOSSES, shard) for shard in shards]
    return [arrays.load(path) for path in files if path.exists()]


def _finite_items(
    bundle: DiffusionBundle, store: Store, config: TeacherConfig, baselines: Iterable[IdArray]
) -> FiniteItems:
    """For the finite teacher: a function from train ids to (images, prompt states, baseline losses).
    Baselines come from ``baselines`` where they hold the ids, else they are computed for just those ids (the
    first-order default scores a few candidates finitely only for its checks)."""
    baseline_of = {int(i): torch.from_numpy(v) for array in baselines for i, v in zip(array.ids, array.values)}

    def items(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, states = images_and_states(bundle, store, store.training_rows(ids))
        if all(i in baseline_of for i in ids):
            baseline = torch.stack([baseline_of[i] for i in ids])
        else:
            baseline = unlearning.baseline_losses(
                bundle, images, states, ids, config.seed, timesteps(config), config.batch_size
            )
        return images, states, baseline

    return items


def open_teacher(
    bundle: DiffusionBundle, store: Store, config: TeacherConfig, shards: list[str], baselines: Iterable[IdArray]
) -> Teacher:
    """The AbU+ teacher over the home's model, factors and training-side data of ``shards``, with the stored
    ``baselines`` of the finite mode (also what ``gda bench teacher`` measures)."""
    modules = select_modules(bundle.unet, config.modules)
    return Teacher(
        bundle,
        modules,
        load_factors(store.folder(layout.EKFAC_FACTORS), list(modules)),
        config,
        load_side=lambda: unlearning.concat_sides(
            [unlearning.load_training_side(store.file(layout.TRAINING_GRADIENTS, shard)) for shard in shards]
        ),
        finite_items=_finite_items(bundle, store, config, baselines),
    )


def candidate_batch(store: Store, batch_key: str) -> QueryBatch:
    """A query batch's generated samples and prompt states with each query's DINO candidates, nearest first."""
    generated = load_generated(store.file(layout.GENERATED_QUERIES, batch_key))
    pairs = store.tables.named("batch_candidates", [batch_key])
    dino = {q: group["train_id"].to_list() for (q,), group in pairs.group_by("query_id", maintain_order=True)}
    return QueryBatch(generated.query_ids.tolist(), generated.samples, generated.prompt_states, dino)
