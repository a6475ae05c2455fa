"""Shard format and ingestion: round trip, and every kind of bad sample ends in rejected_images."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import polars as pl
import torch
import pytest
from PIL import Image

from gda import tables
from gda.corpus.ingest import REASONS, IngestLimits, ingest_shard
from gda.corpus.shards import ShardNameError, ShardReader, ShardSample, image_id, iter_image_bytes, list_shards, write_shard
from shardkit import good, png, write_tar


def test_write_read_round_trip(tmp_path: Path) -> None:
    samples = [
        ShardSample(key=f"00003{i:04d}", image=png(colour=(i, 2 * i, 3 * i)), image_ext="png", captions=[f"icon {i}", f"alt {i}"], meta={"url": f"u{i}", "license": "MIT"})
        for i in range(5)
    ]
    path = write_shard(tmp_path, 3, samples)
    assert path.name == "00003.tar" and (tmp_path / "00003.parquet").exists()
    reader = ShardReader(path)
    entries = list(reader)
    assert reader.read_error is None
    assert [e.key for e in entries] == [s.key for s in samples]
    assert [e.files["png"] for e in entries] == [s.image for s in samples]
    assert entries[2].files["txt"].decode().splitlines() == ["icon 2", "alt 2"]
    meta = pl.read_parquet(tmp_path / "00003.parquet")
    assert meta["key"].to_list() == [s.key for s in samples] and meta["url"].to_list()[4] == "u4"
    # No temp files are left behind after the atomic renames.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00003.parquet", "00003.tar"]

    result = ingest_shard(path)
    assert result.rejected.height == 0
    assert result.accepted["id"].to_list() == [image_id(3, i) for i in range(5)]
    assert result.accepted["captions"].to_list()[1] == ["icon 1", "alt 1"]
    assert dict(iter_image_bytes(path, [samples[4].key]))[samples[4].key] == samples[4].image


def _bad_shard(tmp_path: Path) -> Path:
    truncated = png((64, 64))
    huge = io.BytesIO()
    Image.new("1", (20000, 20000)).save(huge, format="PNG")  # a bomb: tiny file, 400 M declared pixels
    members = [
        *good("a"),
        ("b.png", b"not an image at all"), ("b.txt", b"caption"),
        ("c.png", truncated[: len(truncated) // 2]), ("c.txt", b"caption"),
        ("d.png", png()),  # no caption
        ("e.png", png()), ("e.txt", b"\xff\xfe not utf-8"),
        ("f.png", png((2, 2))), ("f.txt", b"too small"),
        ("g.png", huge.getvalue()), ("g.txt", b"too big"),
        ("h.png", b""), ("h.txt", b"zero bytes"),
        ("i.txt", b"caption without image"),
        ("j.png", png()), ("j.txt", b"x" * 5000),
        ("k.png", png()), ("k.txt", b"ok"), ("k.json", b"[1, 2]"),
        ("l.png", png()), ("l.txt", b"   \n  "),
        *good("a", "the same key again"),
        *good("m"),
    ]
    return write_tar(tmp_path / "00007.tar", members)


def test_every_bad_kind_is_rejected_with_its_reason(tmp_path: Path) -> None:
    result = ingest_shard(_bad_shard(tmp_path), IngestLimits(max_caption_chars=4096))
    reasons = dict(zip(result.rejected["key"].to_list(), result.rejected["reason"].to_list()))
    assert reasons == {
        "b": "undecodable_image",
        "c": "truncated_image",
        "d": "missing_caption",
        "e": "bad_caption_encoding",
        "f": "absurd_size",
        "g": "absurd_size",
        "h": "empty_image",
        "i": "missing_image",
        "j": "caption_too_long",
        "k": "bad_metadata",
        "l": "missing_caption",
    } | {"a": "duplicate_key"}
    # The good samples survive their bad neighbours, with their metadata split into columns.
    accepted = result.accepted
    assert accepted["key"].to_list() == ["a", "m"]
    assert accepted["url"].to_list() == ["https://example.test/a.png", "https://example.test/m.png"]
    assert '"photographer": "tests"' in accepted["extra"][0]
    assert set(result.rejected["reason"]) <= set(REASONS)
    assert result.accepted.schema == tables.polars_schema("training_images")
    assert result.rejected.schema == tables.polars_schema("rejected_images")


def test_truncated_tar_keeps_samples_before_the_damage(tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tar", good("a") + good("b") + good("c"))
    with tarfile.open(full) as tar:
        inside_c = next(m.offset_data for m in tar.getmembers() if m.name == "c.png") + 10
    cut = tmp_path / "00001.tar"
    cut.write_bytes(full.read_bytes()[:inside_c])
    result = ingest_shard(cut)
    assert result.read_error is not None
    assert result.accepted["key"].to_list() == ["a", "b"]
    assert result.rejected["reason"].to_list() == ["truncated_tar"]


def test_members_are_read_never_extracted(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "00002.tar", [("../../escape.png", png()), ("../../escape.txt", b"caption")])
    result = ingest_shard(path)
    assert result.accepted["key"].to_list() == ["escape"]
    assert not (tmp_path.parent.parent / "escape.png").exists()


def test_shard_names_must_be_numeric(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "part-a.tar", good("a"))
    with pytest.raises(ShardNameError, match="NNNNN.tar"):
        ingest_shard(path)
    write_tar(tmp_path / "00004.tar", good("a"))
    assert [p.name for p in list_shards(tmp_path)] == ["00004.tar"]


def test_corpus_images_come_back_in_the_order_asked_across_shards(tmp_path: Path) -> None:
    from gda.diffusion.data import load_corpus_images

    colours = {("00001", "a"): (255, 0, 0), ("00001", "b"): (0, 255, 0), ("00002", "c"): (0, 0, 255)}
    write_tar(tmp_path / "00001.tar", [("a.png", png(colour=colours["00001", "a"])), ("b.png", png(colour=colours["00001", "b"]))])
    write_tar(tmp_path / "00002.tar", [("c.png", png(colour=colours["00002", "c"]))])
    rows = pl.DataFrame({"shard": ["00001", "00002", "00001"], "key": ["b", "c", "a"]})
    images = load_corpus_images(rows, lambda shard: tmp_path / f"{shard}.tar", 16)
    for position, (shard, key) in enumerate(zip(rows["shard"], rows["key"])):
        expected = torch.tensor(colours[shard, key], dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(images[position, :, 0, 0], expected)
