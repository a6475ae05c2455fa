"""Ingest one shard: decide for every sample whether it is usable, and say why not; and say where the
shard's parquet disagrees with its tar.

Every sample ends in exactly one of two frames: ``training_images`` rows (accepted) or ``rejected_images``
rows (with a reason code and a one-line detail). Nothing is silently dropped, and one bad sample never
stops the shard: a damaged tar keeps the samples read before the damage.

The tar is authoritative: it holds the bytes. ``NNNNN.parquet`` (img2dataset's listing of the shard) is only
compared with it, and a disagreement is reported, never acted on.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from PIL import Image

from gda import tables
from gda.corpus.shards import IMAGE_EXTENSIONS, RawEntry, ShardReader, image_id, parquet_path, shard_number

# Reason codes stored in rejected_images.reason.
REASONS: dict[str, str] = {
    "missing_image": "the sample has no image member (jpg, jpeg, png, webp)",
    "empty_image": "the image member is zero bytes",
    "undecodable_image": "the image bytes are not an image Pillow can decode",
    "truncated_image": "the image data ends before the image does",
    "absurd_size": "the image is too small, too large, or declares more pixels than allowed",
    "missing_caption": "no caption text (missing or blank KEY.txt)",
    "bad_caption_encoding": "the caption is not valid UTF-8",
    "caption_too_long": "the caption is longer than the configured limit",
    "bad_metadata": "KEY.json is not a JSON object",
    "duplicate_key": "an earlier sample in this shard has the same key",
    "duplicate_member": "the sample has two members with the same extension",
    "truncated_tar": "the tar ends (or is corrupt) while this sample is being read",
}


@dataclass(frozen=True)
class IngestLimits:
    min_side: int = 8
    max_side: int = 16384
    max_pixels: int = 64 * 1024 * 1024  # well below Pillow's own bomb limit, so we reject before decoding
    max_caption_chars: int = 4096


# Keys named per kind of disagreement in a one-line summary.
EXAMPLES = 3


@dataclass(frozen=True)
class ParquetAgreement:
    """How the shard's parquet agrees with its tar. Keys are sorted (img2dataset keys sort in tar order)."""

    parquet: str | None  # file name; None when the shard has none, which is fine: a tar alone is a shard
    unreadable: str | None = None  # why the parquet could not be compared
    only_in_tar: tuple[str, ...] = ()  # samples of the tar the parquet does not list
    only_in_parquet: tuple[str, ...] = ()  # downloads the parquet lists as successful that the tar lacks
    caption_differs: tuple[str, ...] = ()  # accepted samples whose caption is not the parquet's

    @property
    def disagreements(self) -> int:
        return len(self.only_in_tar) + len(self.only_in_parquet) + len(self.caption_differs)

    @property
    def agrees(self) -> bool:
        return self.unreadable is None and self.disagreements == 0

    def summary(self) -> str:
        if self.parquet is None:
            return "no parquet beside the tar: nothing to compare (the tar alone is a complete shard)"
        if self.unreadable is not None:
            return f"{self.parquet} could not be compared ({self.unreadable}); the tar was ingested as is"
        kinds = (
            ("keys only in the tar", self.only_in_tar),
            ("keys only in the parquet", self.only_in_parquet),
            ("captions differ", self.caption_differs),
        )
        found = [f"{what}: {len(keys)} (first: {', '.join(keys[:EXAMPLES])})" for what, keys in kinds if keys]
        if not found:
            return f"{self.parquet} agrees with the tar"
        return f"{self.parquet} disagrees with the tar, which was ingested as is: " + "; ".join(found)


@dataclass(frozen=True)
class IngestResult:
    shard: str
    accepted: pl.DataFrame  # conforms to training_images
    rejected: pl.DataFrame  # conforms to rejected_images
    read_error: str | None
    parquet: ParquetAgreement


class Rejection(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _decode_image(data: bytes, limits: IngestLimits) -> tuple[int, int, str]:
    """Open and fully decode the image (catching truncation); returns width, height, format."""
    if not data:
        raise Rejection("empty_image", "image member is 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise Rejection("absurd_size", f"declares {width}x{height} pixels, over {limits.max_pixels}")
            if min(width, height) < limits.min_side or max(width, height) > limits.max_side:
                raise Rejection(
                    "absurd_size", f"{width}x{height} is outside {limits.min_side}..{limits.max_side} px per side"
                )
            image.load()
            return width, height, str(image.format)
    except Rejection:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Rejection("absurd_size", str(error)) from error
    except OSError as error:
        message = str(error)
        if "truncated" in message or "broken data stream" in message:
            raise Rejection("truncated_image", message) from error
        raise Rejection("undecodable_image", message) from error
    except (ValueError, SyntaxError, Image.UnidentifiedImageError) as error:
        raise Rejection("undecodable_image", str(error)) from error


def caption_lines(text: str) -> list[str]:
    """The captions in a caption text: its non-blank lines, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _captions(data: bytes | None, limits: IngestLimits) -> list[str]:
    if data is None:
        raise Rejection("missing_caption", "no KEY.txt member")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Rejection("bad_caption_encoding", f"not UTF-8 at byte {error.start}") from error
    if len(text) > limits.max_caption_chars:
        raise Rejection("caption_too_long", f"{len(text)} characters, limit {limits.max_caption_chars}")
    captions = caption_lines(text)
    if not captions:
        raise Rejection("missing_caption", "KEY.txt is blank")
    return captions


def _metadata(data: bytes | None) -> dict[str, object]:
    if data is None:
        return {}
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Rejection("bad_metadata", f"KEY.json does not parse: {error}") from error
    except RecursionError as error:
        raise Rejection("bad_metadata", "KEY.json nests deeper than Python's recursion limit") from error
    if not isinstance(meta, dict):
        raise Rejection("bad_metadata", f"KEY.json holds a {type(meta).__name__}, not an object")
    return meta


def _image_member(entry: RawEntry) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in entry.files:
            return entry.files[ext]
    raise Rejection("missing_image", f"members present: {', '.join(sorted(entry.files)) or 'none'}")


def _accept(entry: RawEntry, shard: str, number: int, seen: set[str], limits: IngestLimits) -> dict[str, object]:
    if entry.truncated:
        raise Rejection("truncated_tar", "the tar ends or is corrupt inside this sample")
    if entry.key in seen:
        raise Rejection("duplicate_key", f"key {entry.key!r} already appeared in shard {shard}")
    if entry.repeated_members:
        raise Rejection("duplicate_member", f"repeated members: {', '.join(entry.repeated_members)}")
    image = _image_member(entry)
    width, height, image_format = _decode_image(image, limits)
    captions = _captions(entry.files.get("txt"), limits)
    meta = _metadata(entry.files.get("json"))
    url, license_ = meta.pop("url", None), meta.pop("license", None)
    meta.pop("key", None)
    return {
        "id": image_id(number, entry.ordinal),
        "shard": shard,
        "key": entry.key,
        "caption": captions[0],
        "captions": captions,
        "url": None if url is None else str(url),
        "license": None if license_ is None else str(license_),
        "width": width,
        "height": height,
        "image_format": image_format,
        "sha256": hashlib.sha256(image).hexdigest(),
        "extra": json.dumps(meta, sort_keys=True) if meta else None,
    }


def _image_sha(entry: RawEntry) -> str | None:
    image = next((entry.files[ext] for ext in IMAGE_EXTENSIONS if ext in entry.files), None)
    return hashlib.sha256(image).hexdigest() if image else None


def classify(
    entries: Iterable[RawEntry], shard: str, number: int, limits: IngestLimits
) -> tuple[list[dict], list[dict]]:
    accepted: list[dict[str, object]] = []
    rejected: list[dict[str, object]] = []
    seen: set[str] = set()
    for entry in entries:
        try:
            accepted.append(_accept(entry, shard, number, seen, limits))
        except Rejection as rejection:
            rejected.append(
                {
                    "shard": shard,
                    "key": entry.key,
                    "ordinal": entry.ordinal,
                    "reason": rejection.reason,
                    "detail": rejection.detail.replace("\n", " ")[:500],
                    "sha256": _image_sha(entry),
                }
            )
        seen.add(entry.key)
    return accepted, rejected


def compare_parquet(path: Path, tar_keys: set[str], captions: dict[str, str]) -> ParquetAgreement:
    """Compare the parquet at ``path`` with the tar's sample keys and the first captions of its accepted
    samples (by key)."""
    if not path.is_file():
        return ParquetAgreement(None)
    try:
        columns = [c for c in ("key", "caption", "status") if c in pl.read_parquet_schema(path)]
        listing = pl.read_parquet(path, columns=columns).with_columns(pl.col(columns).cast(pl.String))
    except (pl.exceptions.PolarsError, OSError) as error:
        return ParquetAgreement(path.name, unreadable=f"{type(error).__name__}: {error}".replace("\n", " "))
    if "key" not in columns:
        return ParquetAgreement(path.name, unreadable="it has no key column")
    listing = listing.filter(pl.col("key").is_not_null())
    if "status" in columns:
        # img2dataset lists failed downloads too; only its successes are in the tar.
        listing = listing.filter(pl.col("status") == "success")
    listed = listing["key"].to_list()
    differs: list[str] = []
    if "caption" in columns:
        for key, caption in zip(listed, listing["caption"].to_list()):
            if key in captions and caption_lines(caption or "")[:1] != [captions[key]]:
                differs.append(key)
    return ParquetAgreement(
        path.name,
        only_in_tar=tuple(sorted(tar_keys - set(listed))),
        only_in_parquet=tuple(sorted(set(listed) - tar_keys)),
        caption_differs=tuple(sorted(differs)),
    )


def ingest_shard(path: Path, limits: IngestLimits = IngestLimits()) -> IngestResult:
    if not path.is_file():
        raise FileNotFoundError(
            f"shard {path} does not exist: restore it, or delete its partition if it is gone for good"
        )
    number = shard_number(path)
    shard = path.stem  # the partition key, exactly as the file is named
    reader = ShardReader(path)
    accepted_rows, rejected_rows = classify(reader, shard, number, limits)
    accepted = tables.conform(
        "training_images", pl.DataFrame(accepted_rows, schema=tables.polars_schema("training_images"))
    )
    rejected = tables.conform(
        "rejected_images", pl.DataFrame(rejected_rows, schema=tables.polars_schema("rejected_images"))
    )
    tar_keys = set(accepted["key"].to_list()) | set(rejected["key"].to_list())
    first_captions = dict(zip(accepted["key"].to_list(), accepted["caption"].to_list()))
    return IngestResult(
        shard=shard,
        accepted=accepted,
        rejected=rejected,
        read_error=reader.read_error,
        parquet=compare_parquet(parquet_path(path), tar_keys, first_captions),
    )
