"""The query engine (ranked answers with their metadata, validation, refusal, training images, opening from a
home, micro-batches) and the audit log (one row per answer, written ahead and fsynced, moved to DuckDB in
batches, kept in the file while another process holds the database)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest
from PIL import Image
from servicekit import ServedHome

from gda.attribution_index import INDEX_FILE, load_index
from gda.audit import AuditLog
from gda.embedder import Embedder, EmbedderConfig, load_embedder
from gda.home import Home
from gda.queries import png_bytes
from gda.service import (
    EMBEDDER_FOLDER,
    INDEX_FOLDER,
    Attribution,
    AttributionEngine,
    ImageTooLarge,
    InvalidImage,
    Match,
    VersionMismatch,
    Versions,
    open_engine,
    read_metadata,
)


@pytest.fixture(scope="module")
def engine(served_home: ServedHome, tiny_encoders) -> Iterator[AttributionEngine]:
    home = served_home.home
    with AttributionEngine(
        load_embedder(home.artifacts / EMBEDDER_FOLDER),
        load_index(home.artifacts / INDEX_FOLDER / INDEX_FILE),
        *tiny_encoders,
        read_metadata(home.duckdb_path),
        home.shards,
        served_home.model_version,
    ) as engine:
        yield engine


def stored_rows(home: Home) -> dict[int, dict]:
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        frame = con.execute("SELECT id, caption, url, license FROM training_images").pl()
    return {row["id"]: row for row in frame.iter_rows(named=True)}


def test_answers_are_ranked_by_score_and_carry_their_metadata(
    engine: AttributionEngine, served_home: ServedHome
) -> None:
    train_id = served_home.ids[3]
    image = served_home.images[train_id]
    answer = engine.attribute(image, "a yellow square", 5)
    assert [m.rank for m in answer.results] == [1, 2, 3, 4, 5]
    scores = [m.score for m in answer.results]
    assert scores == sorted(scores, reverse=True)
    rows = stored_rows(served_home.home)
    for match in answer.results:
        assert (match.caption, match.url, match.license) == tuple(
            rows[match.train_id][c] for c in ("caption", "url", "license")
        )
    assert answer.versions == Versions(
        served_home.model_version, served_home.embedder_version, served_home.index_version
    )
    assert answer.image_sha256 == hashlib.sha256(image).hexdigest()
    assert answer.prompt == "a yellow square" and answer.top_k == 5
    assert set(answer.timings_ms) == {"wait", "image_features", "text_features", "features", "embed", "search", "total"}
    assert answer.batch_size == 1
    payload = json.loads(json.dumps(answer.payload()))
    assert payload["results"][0] == {
        "rank": 1,
        "train_id": answer.results[0].train_id,
        "score": scores[0],
        "caption": answer.results[0].caption,
        "url": answer.results[0].url,
        "license": answer.results[0].license,
    }
    assert payload["versions"] == {
        "model": served_home.model_version,
        "embedder": served_home.embedder_version,
        "index": served_home.index_version,
    }


def test_a_training_image_with_its_caption_scores_itself_as_high_as_anything(
    engine: AttributionEngine, served_home: ServedHome
) -> None:
    # The query and training embeddings of the same features are the same unit vector (s starts negative, so
    # the query sign is +1): its inner product is 1, which nothing can exceed. Ties are possible; no more.
    assert engine.embedder.retrieval_sign == 1.0
    for train_id in served_home.ids[::3]:
        answer = engine.attribute(served_home.images[train_id], served_home.captions[train_id], 3)
        own = {m.train_id: m.score for m in answer.results}
        assert own.get(train_id) == pytest.approx(1.0, abs=1e-4)
        assert answer.results[0].score <= own[train_id] + 1e-4


def test_a_pil_image_is_hashed_as_its_png_encoding(engine: AttributionEngine, served_home: ServedHome) -> None:
    train_id = served_home.ids[0]
    image = Image.open(io.BytesIO(served_home.images[train_id]))
    from_pil = engine.attribute(image, "a red square", 4)
    from_bytes = engine.attribute(served_home.images[train_id], "a red square", 4)
    assert from_pil.image_sha256 == hashlib.sha256(png_bytes(image)).hexdigest()
    assert [m.train_id for m in from_pil.results] == [m.train_id for m in from_bytes.results]


def bomb() -> bytes:
    """A small PNG declaring 100 M pixels: over Pillow's 89 M limit, so decoding it must be refused."""
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_queries_get_clear_errors(engine: AttributionEngine, served_home: ServedHome) -> None:
    image = served_home.images[served_home.ids[0]]
    for prompt in ("", "   \n"):
        with pytest.raises(ValueError, match="prompt is empty"):
            engine.attribute(image, prompt, 3)
    assert engine.max_top_k == len(served_home.ids) == 12
    for top_k in (0, -1, 13, 1001, True, 2.5):
        with pytest.raises(ValueError, match=rf"top_k must be an integer from 1 to 12, got {top_k!r}"):
            engine.attribute(image, "a red square", top_k)
    with pytest.raises(InvalidImage, match="not a decodable image"):
        engine.attribute(b"this is not an image", "a red square", 3)
    with pytest.raises(InvalidImage, match="not a decodable image"):
        engine.attribute(image[: len(image) // 2], "a red square", 3)
    with pytest.raises(ImageTooLarge, match="image too large to decode"):
        engine.attribute(bomb(), "a red square", 3)


def test_an_index_built_for_another_embedder_is_refused(engine: AttributionEngine, served_home: ServedHome) -> None:
    stale = replace(engine.index, manifest=replace(engine.index.manifest, embedder_version="0123456789ab"))
    refusing = AttributionEngine(
        engine.embedder, stale, engine.image_encoder, engine.text_encoder, engine.metadata, engine.shards, "m"
    )
    assert engine.refusal is None
    assert "built for embedder 0123456789ab" in str(refusing.refusal)
    with pytest.raises(VersionMismatch, match=r"re-materialize attribution_index") as raised:
        refusing.attribute(served_home.images[served_home.ids[0]], "a red square", 3)
    assert "\n" not in str(raised.value)
    refusing.close()


def test_the_embedder_must_take_the_encoders_features(engine: AttributionEngine) -> None:
    other = Embedder(EmbedderConfig(input_dim=100, image_dim=60, widths=(8,)))
    with pytest.raises(
        ValueError, match="the embedder takes 60 image \\+ 40 text features, but the encoders give 1280"
    ):
        AttributionEngine(
            other, engine.index, engine.image_encoder, engine.text_encoder, engine.metadata, engine.shards, "m"
        )


def test_training_images_come_with_metadata_and_their_bytes(engine: AttributionEngine, served_home: ServedHome) -> None:
    train_id = served_home.ids[7]
    metadata, data = engine.training_image(train_id)
    assert data == served_home.images[train_id]
    assert metadata["media_type"] == "image/png" and metadata["id"] == train_id
    assert metadata["caption"] == served_home.captions[train_id] and metadata["url"].startswith(
        "https://example.test/1/"
    )
    with pytest.raises(KeyError, match="no training image with id 12345"):
        engine.training_image(12345)
    elsewhere = AttributionEngine(
        engine.embedder,
        engine.index,
        engine.image_encoder,
        engine.text_encoder,
        engine.metadata,
        Path("/nonexistent"),
        "m",
    )
    with pytest.raises(FileNotFoundError, match="re-ingest shard 00001"):
        elsewhere.training_image(train_id)
    elsewhere.close()


def test_open_engine_loads_a_home_and_names_what_is_missing(served_home: ServedHome, tmp_path: Path) -> None:
    empty = Home(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="materialize attribution_embedder first"):
        open_engine(empty, "tiny")
    copy = Home(tmp_path / "copy")
    shutil.copytree(served_home.home.root / "artifacts", copy.artifacts)
    with pytest.raises(FileNotFoundError, match="materialize training_images first"):
        open_engine(copy, "tiny")
    duckdb.connect(str(copy.duckdb_path)).close()  # a database without the table
    with pytest.raises(FileNotFoundError, match="has no training_images table"):
        open_engine(copy, "tiny")
    shutil.copy(served_home.home.duckdb_path, copy.duckdb_path)
    shutil.rmtree(copy.artifacts / "diffusion_model")
    with open_engine(copy, "tiny", shards=served_home.home.shards) as engine:
        assert engine.versions.model == "unknown"
        assert engine.audit is None
        assert engine.training_image(served_home.ids[0])[1] == served_home.images[served_home.ids[0]]
    (copy.artifacts / INDEX_FOLDER / INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="materialize attribution_index first"):
        open_engine(copy, "tiny")


# -- audit log -------------------------------------------------------------------------------------


def answer(prompt: str = "a red square") -> Attribution:
    matches = [
        Match(1, 42, 0.9, "a red square", "https://example.test/42.png", "CC0-1.0"),
        Match(2, 7, 0.5, "a dog", None, None),
    ]
    return Attribution(
        matches, Versions("model1", "emb1", "index1"), "ab" * 32, prompt, 2, {"total": 12.5}, str(uuid.uuid4()), 1
    )


def logged(database: Path) -> list[dict]:
    with duckdb.connect(str(database), read_only=True) as con:
        return con.execute("SELECT * FROM attribution_log ORDER BY logged_at").pl().to_dicts()


def written(log: AuditLog) -> list[str]:
    """The prompts of the rows in the write-ahead file, in order."""
    return [json.loads(line)["prompt"] for line in log.spool.read_text().splitlines()]


@contextmanager
def held_by_another_process(database: Path) -> Iterator[None]:
    """DuckDB's file lock is per process: a write connection held by a child process."""
    script = "import duckdb, sys; con = duckdb.connect(sys.argv[1]); print('holding', flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(database)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_each_answer_is_one_row_written_ahead_then_moved(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "gda.duckdb", tmp_path / "spool.jsonl", "cli")
    first, second = answer("first"), answer("second")
    log.record([first])
    log.record([second])
    assert written(log) == ["first", "second"]
    assert not log.database.exists()  # nothing touched DuckDB on the answer path
    assert log.move() == 2
    rows = logged(log.database)
    assert [r["prompt"] for r in rows] == ["first", "second"]
    assert [r["log_id"] for r in rows] == [first.log_id, second.log_id]
    assert rows[0] | {"log_id": None, "logged_at": None} == {
        "log_id": None,
        "logged_at": None,
        "interface": "cli",
        "image_sha256": "ab" * 32,
        "prompt": "first",
        "top_k": 2,
        "model_version": "model1",
        "embedder_version": "emb1",
        "index_version": "index1",
        "train_ids": [42, 7],
        "scores": [0.9, 0.5],
        "latency_ms": 12.5,
    }
    assert log.spool.read_text() == "" and log.move() == 0
    with pytest.raises(ValueError, match="interface must be one of"):
        AuditLog(tmp_path / "gda.duckdb", tmp_path / "spool.jsonl", "python")


def test_a_locked_database_keeps_the_rows_written_ahead_and_a_later_move_stores_them_once(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "gda.duckdb", tmp_path / "spool.jsonl", "http", lock_wait_s=0.2)
    log.record([answer("before")])
    assert log.move() == 1
    with held_by_another_process(log.database):
        log.record([answer("while locked"), answer("still locked")])
        assert log.move() == 0
    assert written(log) == ["while locked", "still locked"] and log.pending() == 2
    log.record([answer("after")])
    assert log.move() == 3
    assert [r["prompt"] for r in logged(log.database)] == ["before", "while locked", "still locked", "after"]
    assert log.spool.read_text() == ""

    # A crash between the insert and the file's truncation leaves stored rows in it: not stored twice.
    stored = logged(log.database)[1]
    log.spool.write_text(
        json.dumps({**stored, "logged_at": stored["logged_at"].isoformat(timespec="microseconds")}) + "\n"
    )
    log.record([answer("later")])
    assert log.move() == 2
    rows = logged(log.database)
    assert [r["prompt"] for r in rows] == ["before", "while locked", "still locked", "after", "later"]
    assert len({r["log_id"] for r in rows}) == 5


def test_concurrent_records_share_fsyncs_and_every_row_is_a_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path / "gda.duckdb", tmp_path / "spool.jsonl", "http")
    real_fsync, syncs = os.fsync, []

    def slow_fsync(handle: int) -> None:
        syncs.append(handle)
        time.sleep(0.02)  # a disk's flush: records arriving meanwhile wait for the next one, together
        real_fsync(handle)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: log.record([answer(f"answer {i}")]), range(40)))
    assert sorted(written(log)) == sorted(f"answer {i}" for i in range(40))
    assert 1 <= len(syncs) < 40
    assert log.move() == 40
    log.close()


def test_a_torn_last_line_is_skipped_and_the_next_row_kept(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "gda.duckdb", tmp_path / "spool.jsonl", "cli")
    log.spool.write_text('{"log_id": "torn by a power lo')
    log.record([answer("next")])
    with pytest.warns(UserWarning, match="skipping an audit row that is not JSON"):
        assert log.move() == 1
    assert [r["prompt"] for r in logged(log.database)] == ["next"]


def test_concurrent_queries_are_answered_in_micro_batches_each_with_its_own_answer(
    engine: AttributionEngine, served_home: ServedHome
) -> None:
    queries = [(served_home.images[train_id], served_home.captions[train_id]) for train_id in served_home.ids]
    alone = [engine.attribute(image, prompt, 4) for image, prompt in queries]
    assert {a.batch_size for a in alone} == {1}
    with ThreadPoolExecutor(max_workers=len(queries)) as pool:
        together = list(pool.map(lambda query: engine.attribute(*query, 4), queries))
        # Many at once: the prepared queries go to the engine in one call, as /attribute/batch sends them.
        batch = engine.answer([engine.prepare(image, prompt, 4) for image, prompt in queries])
    assert max(a.batch_size for a in together) > 1
    assert {a.batch_size for a in batch} == {len(queries)}
    for one, concurrent, batched in zip(alone, together, batch, strict=True):
        for other in (concurrent, batched):
            assert [m.train_id for m in other.results] == [m.train_id for m in one.results]
            assert [m.score for m in other.results] == pytest.approx([m.score for m in one.results], abs=1e-5)
            assert other.image_sha256 == one.image_sha256 and other.prompt == one.prompt
    assert len({a.log_id for a in alone + together + batch}) == 3 * len(queries)
