"""img2dataset / webdataset shards: ``NNNNN.tar`` holding ``KEY.jpg|png``, ``KEY.txt``, ``KEY.json``, plus
``NNNNN.parquet`` metadata. This is the layout LAION subsets arrive in.

Reading treats every tar member as data: nothing is ever extracted to a path taken from the archive.
Members are grouped the webdataset way (consecutive members sharing a key form one sample), so a key that
reappears later in the tar is a second sample with a duplicate key, which ingestion rejects.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from PIL import Image

from gda.images import to_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_DIGITS = 5


class ShardNameError(ValueError):
    """A shard file whose name is not ``NNNNN.tar``."""


@dataclass(frozen=True)
class ShardSample:
    """One sample to write: image bytes plus its caption lines and JSON metadata."""

    key: str
    image: bytes
    image_ext: str
    captions: list[str]
    meta: dict[str, object] = field(default_factory=dict)


@dataclass
class RawEntry:
    """One sample as read: raw member bytes by extension, never decoded here."""

    key: str
    ordinal: int
    files: dict[str, bytes] = field(default_factory=dict)
    repeated_members: list[str] = field(default_factory=list)
    truncated: bool = False


def _is_number(text: str) -> bool:
    # ASCII only: str.isdigit() also accepts digits such as "²" that int() refuses.
    return text.isascii() and text.isdigit()


def shard_number(path: Path) -> int:
    """The numeric shard index from ``NNNNN.tar``; ids of its images are derived from it."""
    if not _is_number(path.stem):
        raise ShardNameError(
            f"shard {path.name!r} is not named NNNNN.tar as img2dataset writes them; rename it to digits"
        )
    return int(path.stem)


def shard_file(directory: Path, shard: str) -> Path:
    """The tar of shard ``shard`` (a partition key) in ``directory``. Only digits are a shard key, so no key
    (``../x``, a partition added by hand in the UI) can name a file outside the folder."""
    if not _is_number(shard):
        raise ShardNameError(
            f"shard key {shard!r} is not the digits of a NNNNN.tar; shard partitions are named by their tar"
        )
    return Path(directory) / f"{shard}.tar"


def parquet_path(tar: Path) -> Path:
    """Where img2dataset writes a shard's metadata: ``NNNNN.parquet`` beside ``NNNNN.tar``."""
    return tar.with_suffix(".parquet")


def shard_key(number: int) -> str:
    return f"{number:0{SHARD_DIGITS}d}"


def image_id(shard: int, ordinal: int) -> int:
    """A training image's id: shard number in the high 32 bits, its position in the tar in the low.

    Stable across re-ingestion and independent of which other shards exist, so features, scores and the
    index can be computed per shard and joined later."""
    return (shard << 32) | ordinal


def list_shards(directory: Path) -> list[Path]:
    """Shard tars in a folder, sorted; files not named NNNNN.tar are ignored (partial downloads, notes)."""
    return sorted(p for p in Path(directory).glob("*.tar") if _is_number(p.stem) and p.is_file())


def _split_member_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    key, _, ext = base.partition(".")
    return key, ext.lower()


class ShardReader:
    """Streams the samples of a shard in tar order, one at a time (LAION shards hold ~10k images).

    Never raises for a damaged tar: iteration stops, ``read_error`` says why, and the sample being read when
    it happened is yielded with ``truncated`` set. Samples before the damage are yielded as usual."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.read_error: str | None = None

    def __iter__(self) -> Iterator[RawEntry]:
        current: RawEntry | None = None
        ordinal = 0
        try:
            with tarfile.open(self.path, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_member_name(member.name)
                    if current is None or key != current.key:
                        if current is not None:
                            yield current
                        current = RawEntry(key=key, ordinal=ordinal)
                        ordinal += 1
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} ends after {len(data)} of {member.size} bytes")
                    if ext in current.files:
                        current.repeated_members.append(member.name)
                    else:
                        current.files[ext] = data
        except (tarfile.TarError, EOFError, OSError) as error:
            self.read_error = f"{type(error).__name__}: {error}"
            if current is not None:
                current.truncated = True
        if current is not None:
            yield current


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(directory: Path, number: int, samples: Iterable[ShardSample]) -> Path:
    """Write ``NNNNN.tar`` and ``NNNNN.parquet``; both appear atomically (temp name, then rename), the
    parquet last so a watcher that sees it knows the tar is complete."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = shard_key(number)
    tar_path = directory / f"{stem}.tar"
    rows: list[dict[str, object]] = []
    tmp_tar = tar_path.with_name(f".{stem}.tar.tmp")
    with tarfile.open(tmp_tar, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            _add_member(tar, f"{sample.key}.{sample.image_ext}", sample.image)
            _add_member(tar, f"{sample.key}.txt", "\n".join(sample.captions).encode("utf-8"))
            _add_member(tar, f"{sample.key}.json", json.dumps({"key": sample.key, **sample.meta}).encode("utf-8"))
            rows.append(
                {
                    "key": sample.key,
                    "caption": sample.captions[0] if sample.captions else None,
                    "url": sample.meta.get("url"),
                    "license": sample.meta.get("license"),
                    "width": sample.meta.get("width"),
                    "height": sample.meta.get("height"),
                    "status": "success",
                }
            )
    os.replace(tmp_tar, tar_path)
    metadata = parquet_path(tar_path)
    tmp_parquet = metadata.with_name(f".{stem}.parquet.tmp")
    pl.DataFrame(
        rows,
        schema={
            "key": pl.String,
            "caption": pl.String,
            "url": pl.String,
            "license": pl.String,
            "width": pl.Int64,
            "height": pl.Int64,
            "status": pl.String,
        },
    ).write_parquet(tmp_parquet)
    os.replace(tmp_parquet, metadata)
    return tar_path


def iter_image_bytes(path: Path, keys: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """The image bytes of the given keys, in tar order (the first sample with each key, as ingested)."""
    wanted = set(keys)
    seen: set[str] = set()
    for entry in ShardReader(path):
        if entry.key in wanted and entry.key not in seen:
            seen.add(entry.key)
            ext = next(e for e in IMAGE_EXTENSIONS if e in entry.files)
            yield entry.key, entry.files[ext]


def load_images(path: Path, keys: Sequence[str]) -> list[Image.Image]:
    """The decoded images of ``keys`` (ingested samples) as RGB (``gda.images.to_rgb``), in the order of ``keys``."""
    found = dict(iter_image_bytes(path, keys))
    missing = [key for key in keys if key not in found]
    if missing:
        raise FileNotFoundError(
            f"{path.name} no longer holds {len(missing)} ingested samples (first: {missing[0]}); "
            "the shard changed since ingest: re-materialize training_images for it"
        )
    return [to_rgb(Image.open(io.BytesIO(found[key]))) for key in keys]
