"""Generating one query batch: sampling its prompts, keeping the PNGs and the exact samples and prompt states the
teacher unlearns, and the batch's rows of ``generated_queries`` with the colours each image was asked for and
shows."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import torch

from gda import plots, tables
from gda.diffusion import DiffusionBundle, sample, to_pil
from gda.diffusion.quality import ColourAccuracy, score_colours
from gda.model_card import ModelCard
from gda.model_source import SamplingConfig
from gda.queries import GeneratedBatch, colours_of, png_bytes, save_generated

GALLERY_IMAGES = 32
COLOUR_COLUMNS = ("fg_expected", "bg_expected", "fg_detected", "bg_detected")


@dataclass(frozen=True)
class GeneratedQueries:
    frame: pl.DataFrame  # the batch's rows of generated_queries
    accuracy: ColourAccuracy | None  # over the prompts that name their colours; None when none does
    gallery_png: bytes  # the first GALLERY_IMAGES images, labelled with their query ids and prompts


def generate_queries(
    bundle: DiffusionBundle,
    card: ModelCard,
    prompts: pl.DataFrame,
    sampling: SamplingConfig,
    dtype: torch.dtype,
    batch: str,
    images_folder: Path,
    samples_file: Path,
) -> GeneratedQueries:
    """Sample every query of ``prompts`` (the batch's ``batch_prompts`` rows) with its own seed; write each PNG
    into ``images_folder`` and the exact samples and prompt states to ``samples_file``."""
    result = sample(
        bundle,
        prompts["prompt"].to_list(),
        prompts["seed"].to_list(),
        **asdict(sampling),
        dtype=dtype,
    )
    images = to_pil(result.images)
    images_folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for image, query in zip(images, prompts.iter_rows(named=True), strict=True):
        data = png_bytes(image)
        path = images_folder / f"{query['query_id']}.png"
        path.write_bytes(data)
        rows.append({**query, "image_path": str(path), "image_sha256": hashlib.sha256(data).hexdigest()})
    query_ids = torch.tensor(prompts["query_id"].to_list(), dtype=torch.int64)
    save_generated(samples_file, GeneratedBatch(query_ids, result.samples.cpu(), result.prompt_states.cpu()))
    colours = colours_of(images, prompts["extra"].to_list())
    frame = tables.conform(
        "generated_queries",
        pl.DataFrame(rows)
        .with_columns(
            pl.lit(batch).alias("batch"),
            pl.lit(sampling.steps).alias("steps"),
            pl.lit(sampling.guidance_scale).alias("guidance_scale"),
            pl.lit(sampling.guidance_rescale).alias("guidance_rescale"),
            pl.lit(card.version).alias("model_version"),
        )
        .hstack(pl.DataFrame(colours, schema=dict.fromkeys(COLOUR_COLUMNS, pl.String))),
    )
    labels = [f"{q}: {p}" for q, p in zip(prompts["query_id"].to_list(), prompts["prompt"].to_list())]
    gallery = plots.image_grid_png(
        list(result.images.permute(0, 2, 3, 1).cpu().numpy()[:GALLERY_IMAGES]), labels[:GALLERY_IMAGES]
    )
    return GeneratedQueries(frame, _colour_accuracy(frame), gallery)


def _colour_accuracy(frame: pl.DataFrame) -> ColourAccuracy | None:
    scored = frame.filter(pl.col("fg_expected").is_not_null())
    if not scored.height:
        return None
    detected = list(zip(scored["fg_detected"], scored["bg_detected"]))
    return score_colours(detected, scored["fg_expected"].to_list(), scored["bg_expected"].to_list())
