"""`gda attribute`: a platform's backfill, the attributions of a folder of generated images with their prompts,
written to one Parquet file.

The prompts file (CSV, JSON lines or Parquet, by its suffix) names each image by its path inside the folder
(column `image`) and gives its prompt (column `prompt`). Every item gets one output row, in the prompts
file's order: its answer (`log_id`, `train_ids`, `scores`, `captions`, `urls`, best first) or, for an item
that cannot be answered (a missing or undecodable file, an empty prompt), its `error` and nothing else, so one
bad item does not fail the rest. Items go to the engine a micro-batch at a time, with a progress bar; the
output replaces `out` atomically, once every item has its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
from tqdm import tqdm

from gda.parquet_files import write_parquet_atomically
from gda.service import AttributionEngine, PreparedQuery, Refused

PROMPT_COLUMNS = ("image", "prompt")
OUTPUT_SCHEMA = {
    "image": pl.String,
    "prompt": pl.String,
    "error": pl.String,  # why the item has no answer; null for an answered item
    "log_id": pl.String,
    "train_ids": pl.List(pl.Int64),
    "scores": pl.List(pl.Float64),
    "captions": pl.List(pl.String),
    "urls": pl.List(pl.String),
}


@dataclass(frozen=True)
class BackfillSummary:
    items: int
    answered: int
    errors: int


def read_prompts(path: Path) -> pl.DataFrame:
    """The `image` and `prompt` columns of a CSV, JSON lines or Parquet file, as strings."""
    readers = {".csv": pl.read_csv, ".jsonl": pl.read_ndjson, ".ndjson": pl.read_ndjson, ".parquet": pl.read_parquet}
    if path.suffix.lower() not in readers:
        raise ValueError(f"{path}: give the prompts as .csv, .jsonl or .parquet with columns image, prompt")
    frame = readers[path.suffix.lower()](path)
    missing = [name for name in PROMPT_COLUMNS if name not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}: it needs `image` (a path inside the folder) and `prompt`")
    return frame.select(pl.col(name).cast(pl.String) for name in PROMPT_COLUMNS)


def _item_error(images: Path, image: str | None) -> tuple[Path | None, str | None]:
    if image is None:
        return None, "no image named"
    path = (images / image).resolve()
    if not path.is_relative_to(images.resolve()):
        return None, f"{image} is outside {images}"
    if not path.is_file():
        return None, f"{image}: no such file in {images}"
    return path, None


def attribute_folder(
    engine: AttributionEngine, images: Path, prompts: pl.DataFrame, top_k: int, progress: bool = True
) -> pl.DataFrame:
    """One row per item of `prompts` (OUTPUT_SCHEMA): its answer, or its error."""
    rows: list[dict[str, object]] = []
    chunk = engine.batching.max_size
    items = list(prompts.iter_rows(named=True))
    with tqdm(total=len(items), unit="image", desc="attribute", disable=not progress) as bar:
        for start in range(0, len(items), chunk):
            part = items[start : start + chunk]
            results: list[dict[str, object]] = [
                {**item, **dict.fromkeys(OUTPUT_SCHEMA.keys() - PROMPT_COLUMNS)} for item in part
            ]
            prepared: list[tuple[int, PreparedQuery]] = []
            for i, item in enumerate(part):
                path, error = _item_error(images, item["image"])
                if path is not None:
                    try:
                        prepared.append((i, engine.prepare(path.read_bytes(), item["prompt"] or "", top_k)))
                    except Refused:
                        raise  # the engine answers nothing at all: one loud error, not a file of error rows
                    except (OSError, ValueError) as failure:
                        error = str(failure)
                results[i]["error"] = error
            answers = engine.answer([query for _, query in prepared])
            for (i, _), answer in zip(prepared, answers, strict=True):
                results[i] |= {
                    "log_id": answer.log_id,
                    "train_ids": [match.train_id for match in answer.results],
                    "scores": [match.score for match in answer.results],
                    "captions": [match.caption for match in answer.results],
                    "urls": [match.url for match in answer.results],
                }
            rows += results
            bar.update(len(part))
    return pl.DataFrame(rows, schema=OUTPUT_SCHEMA)


def backfill(engine: AttributionEngine, images: Path, prompts_file: Path, out: Path, top_k: int) -> BackfillSummary:
    """Attribute every item of `prompts_file` and write the rows to `out` (Parquet)."""
    if not images.is_dir():
        raise FileNotFoundError(f"{images} is not a folder of images")
    if not 1 <= top_k <= engine.max_top_k:
        raise ValueError(f"top_k must be an integer from 1 to {engine.max_top_k}, got {top_k}")
    frame = attribute_folder(engine, images, read_prompts(prompts_file), top_k)
    write_parquet_atomically(frame, out)
    errors = frame["error"].is_not_null().sum()
    return BackfillSummary(frame.height, frame.height - errors, errors)
