"""Generated queries: which prompts become queries (split and batched), and the exact record of what was
generated for each, so the teacher can later unlearn exactly that sample."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from gda import tables
from gda.corpus.palette import detect_colours

SPLITS = ("test", "val", "train")  # test first: the evaluation set is fixed before anything else is drawn


@dataclass(frozen=True)
class QueryCounts:
    n_train: int
    n_val: int
    n_test: int
    batch_size: int
    seed: int


def query_seed(seed: int, query_id: int) -> int:
    """The sampling seed of a query: a function of the plan's seed and the query id alone."""
    return int(np.random.SeedSequence([seed, query_id]).generate_state(1, dtype=np.uint32)[0])


def plan_queries(candidates: pl.DataFrame, counts: QueryCounts) -> pl.DataFrame:
    """Draw the test, val and train prompts from ``candidates`` (columns ``prompt`` and ``extra``, JSON or
    null) without replacement, and group each split into query batches of ``counts.batch_size``.

    Test and val prompts are always distinct and never train prompts. When there are fewer distinct prompts
    than queries (a corpus with few captions), the train split repeats the prompts left after test and val,
    each time with its own sampling seed: a generator makes many images per prompt, and each is a query."""
    wanted = {"test": counts.n_test, "val": counts.n_val, "train": counts.n_train}
    if min(wanted.values()) < 0 or counts.batch_size < 1:
        raise ValueError(f"query counts must be >= 0 and batch_size >= 1, got {wanted}, {counts.batch_size}")
    total = sum(wanted.values())
    unique = candidates.unique(subset="prompt", keep="first", maintain_order=True)
    held_out = counts.n_test + counts.n_val
    if unique.height < total and (unique.height <= held_out or counts.n_train == 0):
        raise ValueError(
            f"{total} query prompts requested but only {unique.height} distinct prompts are available, and test "
            f"and val alone need {held_out} plus at least one for train: give query_plan a prompts_file with "
            "more prompts, or lower n_test / n_val"
        )
    order = np.random.default_rng(counts.seed).permutation(unique.height)[: min(total, unique.height)]
    train_pool = order[held_out:]
    order = np.concatenate([order[:held_out], np.resize(train_pool, counts.n_train)])
    chosen = unique[order.tolist()]
    rows: list[dict[str, object]] = []
    start = 0
    for split in SPLITS:
        for position in range(wanted[split]):
            row = chosen.row(start + position, named=True)
            query_id = len(rows)
            rows.append(
                {
                    "query_id": query_id,
                    "split": split,
                    "batch": f"{split}-{position // counts.batch_size:03d}",
                    "prompt": row["prompt"],
                    "seed": query_seed(counts.seed, query_id),
                    "extra": row["extra"],
                }
            )
        start += wanted[split]
    return tables.conform("query_prompts", pl.DataFrame(rows, schema=tables.polars_schema("query_prompts")))


def heldout_candidates(heldout: pl.DataFrame) -> pl.DataFrame:
    """Candidates from the demo corpus's held-out prompts: every column but the prompt goes into extra."""
    attributes = [c for c in heldout.columns if c not in ("prompt", "prompt_id")]
    return heldout.select(
        "prompt",
        pl.struct(attributes)
        .map_elements(lambda s: json.dumps(s, sort_keys=True), return_dtype=pl.String)
        .alias("extra"),
    )


def prompt_file_candidates(path: Path) -> pl.DataFrame:
    """Candidates from a user's file: a parquet with a ``prompt`` column, or a text file of one per line."""
    if path.suffix == ".parquet":
        frame = pl.read_parquet(path)
        if "prompt" not in frame.columns:
            raise ValueError(f"{path} has no 'prompt' column")
        prompts = frame["prompt"].to_list()
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return pl.DataFrame(
        {"prompt": prompts, "extra": [None] * len(prompts)}, schema={"prompt": pl.String, "extra": pl.String}
    )


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class GeneratedBatch:
    query_ids: torch.Tensor  # (n,) int64
    samples: torch.Tensor  # exact final samples (pixels in [-1, 1], or latents)
    prompt_states: torch.Tensor  # the conditioning the sampler used


def save_generated(path: Path, batch: GeneratedBatch) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {
            "query_ids": batch.query_ids.contiguous(),
            "samples": batch.samples.contiguous(),
            "prompt_states": batch.prompt_states.contiguous(),
        },
        str(tmp),
    )
    tmp.replace(path)


def load_generated(path: Path) -> GeneratedBatch:
    tensors = load_file(str(path))
    return GeneratedBatch(tensors["query_ids"], tensors["samples"], tensors["prompt_states"])


def colours_of(images: Sequence[Image.Image], extras: Sequence[str | None]) -> list[dict[str, str | None]]:
    """Expected (from the prompt's attributes, when it has them) and detected fg/bg colours per image."""
    out = []
    for image, extra in zip(images, extras, strict=True):
        attributes = json.loads(extra) if extra else {}
        fg, bg = detect_colours(image)
        expected = "fg" in attributes and "bg" in attributes
        out.append(
            {
                "fg_expected": attributes.get("fg"),
                "bg_expected": attributes.get("bg"),
                "fg_detected": fg if expected else None,
                "bg_detected": bg if expected else None,
            }
        )
    return out
