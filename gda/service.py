"""The query engine behind `gda query` and `gda serve` (no web framework here): given a generated image and
its prompt, the most influential training images with their metadata, in milliseconds.

Everything is loaded once: the embedder, the attribution index, the image and text encoders and the
training images' metadata. Concurrent requests are answered in micro-batches (gda.micro_batch): a batch
encodes its images and its prompts concurrently (the text encoder is the cost over an image-only baseline),
embeds concat(image, text) as queries, searches the index once and joins the metadata; each answer's audit
row is on disk before the answer is returned, one fsync per batch. The engine refuses to answer
(`VersionMismatch`) when the index was built with another embedder than the one loaded: its vectors would not
be comparable, and the answers silently wrong. It also holds the home's generated test queries, for people to
try it on.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
from PIL import Image

from gda.attribution_index import INDEX_FILE, AttributionIndex, load_index, search
from gda.audit import AuditLog
from gda.connections import connect
from gda.corpus.shards import iter_image_bytes
from gda.embedder import CONFIG_FILE, Embedder, load_embedder
from gda.encoders import EncoderSpec, ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from gda.home import Home
from gda.micro_batch import BatchSettings, MicroBatcher
from gda.model_card import read_card
from gda.profiles import profile_values
from gda.queries import png_bytes
from sql import named_query

MAX_TOP_K = 1000
EMBEDDER_FOLDER = "attribution_embedder"
INDEX_FOLDER = "attribution_index"
METADATA_COLUMNS = ("id", "shard", "key", "caption", "url", "license", "image_format")
_METADATA_LOCK_WAIT_S = 10.0  # opening is rare and may wait out a short Dagster write


class InvalidImage(ValueError):
    """The query image is not an image Pillow can decode."""


class ImageTooLarge(InvalidImage):
    """The query image declares more pixels than Pillow's decompression-bomb limit."""


class Refused(ValueError):
    """The engine's parts do not fit together, so it answers nothing until an asset is re-materialized."""


class VersionMismatch(Refused):
    """The index was built from embeddings of another embedder version than the one loaded."""


@dataclass(frozen=True)
class Match:
    rank: int  # 1 = most influential
    train_id: int
    score: float  # inner product of the query and training embeddings: higher = more influential
    caption: str
    url: str | None
    license: str | None


@dataclass(frozen=True)
class Versions:
    model: str  # the diffusion model the attributions are for
    embedder: str
    index: str


@dataclass(frozen=True)
class GeneratedQuery:
    """A held-out test query as the diffusion model generated it."""

    query_id: int
    prompt: str
    image: Path  # its PNG


@dataclass(frozen=True)
class Attribution:
    results: list[Match]
    versions: Versions
    image_sha256: str  # of the image bytes as given; of the PNG encoding for a PIL image
    prompt: str
    top_k: int
    # wait (queued before its batch started), image_features, text_features, features (both, concurrent),
    # embed, search (each the whole batch's) and total (from the request to its answer, logging excluded)
    timings_ms: dict[str, float]
    log_id: str  # uuid4: the answer's attribution_log row
    batch_size: int  # requests answered in the same micro-batch

    def payload(self) -> dict[str, Any]:
        """The JSON answer of the CLI and the HTTP API."""
        return {
            "results": [asdict(match) for match in self.results],
            "versions": asdict(self.versions),
            "image_sha256": self.image_sha256,
            "log_id": self.log_id,
            "batch_size": self.batch_size,
            "timings_ms": self.timings_ms,
        }


@dataclass(frozen=True)
class PreparedQuery:
    """A query checked and decoded by `AttributionEngine.prepare`, waiting for its micro-batch."""

    picture: Image.Image
    prompt: str
    top_k: int
    image_sha256: str  # of the image bytes as given; of the PNG encoding for a PIL image
    started: float  # perf_counter when it arrived


def decode_image(data: bytes) -> Image.Image:
    """The fully decoded image in `data`; InvalidImage (ImageTooLarge for a decompression bomb) otherwise."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its pixel limit and twice that; a service must not decode those either.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(f"image too large to decode: {error}") from error
    except Image.UnidentifiedImageError as error:
        raise InvalidImage("not a decodable image: Pillow recognises no image format in these bytes") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise InvalidImage(f"not a decodable image ({type(error).__name__}: {error})") from error
    return image


def _timed(function, *args) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args)
    return result, (time.perf_counter() - started) * 1000


class AttributionEngine:
    """Answers attribution queries against one embedder, index and metadata snapshot; thread-safe."""

    def __init__(
        self,
        embedder: Embedder,
        index: AttributionIndex,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        metadata: pl.DataFrame,
        shards: Path,
        model_version: str,
        audit: AuditLog | None = None,
        test_queries: Sequence[GeneratedQuery] = (),
        batching: BatchSettings = BatchSettings(),
        embed_queries: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """`embed_queries` is the embedder's own by default; `open_engine` passes its `query_network`."""
        config = embedder.config
        if (config.image_dim, config.input_dim - config.image_dim) != (image_encoder.dim, text_encoder.dim):
            raise ValueError(
                f"the embedder takes {config.image_dim} image + {config.input_dim - config.image_dim} text features, "
                f"but the encoders give {image_encoder.dim} ({image_encoder.name}) + {text_encoder.dim} "
                f"({text_encoder.name}): "
                "open the engine with the profile the embedder was trained with"
            )
        missing = [name for name in METADATA_COLUMNS if name not in metadata.columns]
        if missing:
            raise ValueError(f"training metadata lacks columns {missing}")
        self.embedder = embedder
        self._embed_queries = embed_queries or embedder.embed_queries
        self.index = index
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.metadata = metadata.select(METADATA_COLUMNS).sort("id")
        self._ids = self.metadata["id"].to_numpy()
        self.shards = shards
        self.model_version = model_version
        self.audit = audit
        self.test_queries = {query.query_id: query for query in test_queries}
        # Encoders and embedder are not promised to be thread-safe, so one batch at a time computes;
        # the pool runs the text half of each batch beside its image half.
        self._text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gda-text")
        self.batching = batching
        self._batcher = MicroBatcher(self._answer_batch, batching)
        if audit is not None:
            audit.start()

    def close(self) -> None:
        """Answer what is queued, stop the text worker and move the audit rows left in its write-ahead file."""
        self._batcher.close()
        self._text_pool.shutdown()
        if self.audit is not None:
            self.audit.close()

    def __enter__(self) -> AttributionEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def versions(self) -> Versions:
        return Versions(self.model_version, str(self.embedder.version), self.index.manifest.version)

    @property
    def refusal(self) -> str | None:
        """Why the engine refuses every query, or None when it answers."""
        built_for, loaded = self.index.manifest.embedder_version, self.embedder.version
        if built_for != loaded:
            return (
                f"the attribution index was built for embedder {built_for} but embedder {loaded} is loaded: "
                "re-materialize attribution_index (a running gda serve loads it when it starts)"
            )
        return None

    @property
    def max_top_k(self) -> int:
        return min(MAX_TOP_K, self.index.manifest.count)

    def prepare(self, image: bytes | Image.Image, prompt: str, top_k: int) -> PreparedQuery:
        """A checked request: `image` is encoded bytes (decoded here, guarded against decompression bombs) or a
        PIL image. Raises VersionMismatch, InvalidImage, or ValueError for an empty prompt or a top_k outside
        1..max_top_k."""
        started = time.perf_counter()
        if self.refusal is not None:
            raise VersionMismatch(self.refusal)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty: attribution needs the prompt the image was generated from")
        if isinstance(top_k, bool) or not isinstance(top_k, Integral) or not 1 <= top_k <= self.max_top_k:
            raise ValueError(f"top_k must be an integer from 1 to {self.max_top_k}, got {top_k!r}")
        if isinstance(image, bytes):
            data, picture = image, decode_image(image)
        else:
            data, picture = png_bytes(image), image
        return PreparedQuery(picture, prompt, int(top_k), hashlib.sha256(data).hexdigest(), started)

    def attribute(self, image: bytes | Image.Image, prompt: str, top_k: int) -> Attribution:
        """The `top_k` most influential training images for `image` generated from `prompt`, best first,
        answered in one micro-batch with whatever other requests are waiting; errors as `prepare`. The answer
        is on disk in the audit log, when the engine has one, before it is returned."""
        return self.answer([self.prepare(image, prompt, top_k)])[0]

    def answer(self, requests: Sequence[PreparedQuery]) -> list[Attribution]:
        """The answers of prepared requests, in order, batched with whatever else is waiting."""
        return self._batcher(requests)

    def _answer_batch(self, requests: Sequence[PreparedQuery]) -> list[Attribution]:
        features_started = time.perf_counter()
        text_job = self._text_pool.submit(_timed, self.text_encoder.encode, [r.prompt for r in requests])
        image_features, image_ms = _timed(self.image_encoder.encode, [r.picture for r in requests])
        text_features, text_ms = text_job.result()
        features_ms = (time.perf_counter() - features_started) * 1000
        query, embed_ms = _timed(self._embed_queries, np.concatenate([image_features, text_features], axis=1))
        # The nearest max(top_k) hold each request's nearest top_k, in the same order.
        (ids, scores), search_ms = _timed(search, self.index, query, max(r.top_k for r in requests))
        answers = []
        for request, row_ids, row_scores in zip(requests, ids, scores, strict=True):
            row_ids, row_scores = row_ids[: request.top_k], row_scores[: request.top_k]
            found = row_ids >= 0  # an IVF index may find fewer than top_k
            timings = {
                "wait": (features_started - request.started) * 1000,
                "image_features": image_ms,
                "text_features": text_ms,
                "features": features_ms,
                "embed": embed_ms,
                "search": search_ms,
                "total": (time.perf_counter() - request.started) * 1000,
            }
            answers.append(
                Attribution(
                    self.matches(row_ids[found], row_scores[found]),
                    self.versions,
                    request.image_sha256,
                    request.prompt,
                    request.top_k,
                    timings,
                    str(uuid.uuid4()),
                    len(requests),
                )
            )
        if self.audit is not None:
            self.audit.record(answers)
        return answers

    def _rows(self, train_ids: np.ndarray) -> pl.DataFrame:
        positions = np.searchsorted(self._ids, train_ids).clip(max=len(self._ids) - 1)
        unknown = train_ids[self._ids[positions] != train_ids]
        if len(unknown):
            raise Refused(
                f"{len(unknown)} indexed training ids (first: {int(unknown[0])}) are not in training_images: "
                "the corpus changed since the index was built; re-materialize attribution_index"
            )
        return self.metadata[positions.tolist()]

    def matches(self, train_ids: np.ndarray, scores: np.ndarray) -> list[Match]:
        """Search hits (best first) joined with their training metadata, ranked from 1."""
        rows = self._rows(train_ids).iter_rows(named=True)
        return [
            Match(rank, int(row["id"]), float(score), row["caption"], row["url"], row["license"])
            for rank, (row, score) in enumerate(zip(rows, scores, strict=True), start=1)
        ]

    def training_image(self, train_id: int) -> tuple[dict[str, Any], bytes]:
        """A training image's metadata (with its `media_type`) and its bytes as stored in its shard.

        KeyError for an id that is not a training image; FileNotFoundError if its shard no longer holds it.
        """
        position = int(np.searchsorted(self._ids, train_id))
        if position == len(self._ids) or self._ids[position] != train_id:
            raise KeyError(f"no training image with id {train_id}")
        row = self.metadata.row(position, named=True)
        path = self.shards / f"{row['shard']}.tar"
        found = dict(iter_image_bytes(path, [row["key"]]))
        if row["key"] not in found:
            raise FileNotFoundError(
                f"{path} is missing or no longer holds sample {row['key']}: re-ingest shard {row['shard']}"
            )
        return {**row, "media_type": f"image/{row['image_format'].lower()}"}, found[row["key"]]

    def query_image(self, query_id: int) -> bytes:
        """The PNG of a generated test query.

        KeyError for an id that is not one of `test_queries`; FileNotFoundError if its file is gone.
        """
        if query_id not in self.test_queries:
            raise KeyError(f"no generated test query with id {query_id}")
        path = self.test_queries[query_id].image
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: re-materialize generated_queries")
        return path.read_bytes()


def read_metadata(database: Path) -> pl.DataFrame:
    """The serving metadata of every training image, from a short-lived read-only connection."""
    try:
        with connect(database, read_only=True, wait_s=_METADATA_LOCK_WAIT_S) as con:
            return con.execute(named_query("serving_metadata")).pl()
    except duckdb.CatalogException as error:
        raise FileNotFoundError(
            f"{database} has no training_images table: materialize training_images first"
        ) from error


def read_test_queries(home: Home) -> list[GeneratedQuery]:
    """The home's generated test queries in query order, from a short-lived read-only connection."""
    with connect(home.duckdb_path, read_only=True, wait_s=_METADATA_LOCK_WAIT_S) as con:
        rows = con.execute(named_query("test_queries")).pl().select("query_id", "prompt", "image_path")
    # image_path is under the artifact root; the asset stores it absolute, which the join keeps as is.
    return [
        GeneratedQuery(query_id, prompt, home.artifacts / image_path)
        for query_id, prompt, image_path in rows.iter_rows()
    ]


def open_engine(
    home: Home,
    profile: str | None = None,
    device: str = "cpu",
    shards: Path | None = None,
    interface: str | None = None,
    audit: AuditLog | None = None,
) -> AttributionEngine:
    """The engine over a home's materialized assets, with the encoders and micro-batching of `profile` on
    `device`.

    `shards` overrides the home's shard folder (where `gda ingest --shards` read them). With an `interface`
    ('cli' or 'http') every answer is logged to the home's attribution_log, or to `audit` when one is given
    (a benchmark's scratch log). The engine lists the home's
    generated test queries (none before they are materialized). FileNotFoundError names the asset to
    materialize when one is missing.
    """
    embedder_folder = home.artifacts / EMBEDDER_FOLDER
    index_path = home.artifacts / INDEX_FOLDER / INDEX_FILE
    for path, asset in (
        (embedder_folder / CONFIG_FILE, EMBEDDER_FOLDER),
        (index_path, INDEX_FOLDER),
        (home.duckdb_path, "training_images"),
    ):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: materialize {asset} first")
    values = profile_values(profile)
    # The two encoders run side by side on every batch: each gets half the profile's threads.
    threads = max(1, (values["compute"].get("threads") or os.cpu_count() or 2) // 2)
    spec = EncoderSpec(**values["encoders"], device=device, threads=threads)
    try:
        model_version = read_card(home.artifacts / "diffusion_model").version
    except FileNotFoundError:
        model_version = "unknown"
    embedder = load_embedder(embedder_folder, device)
    return AttributionEngine(
        embedder=embedder,
        index=load_index(index_path),
        image_encoder=load_image_encoder(spec),
        text_encoder=load_text_encoder(spec),
        metadata=read_metadata(home.duckdb_path),
        shards=shards if shards is not None else home.shards,
        model_version=model_version,
        audit=audit if audit is not None or interface is None else AuditLog.for_home(home, interface),
        test_queries=read_test_queries(home),
        batching=BatchSettings(**values.get("serving", {})),
        embed_queries=embedder.query_network(spec),
    )
