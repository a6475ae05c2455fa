"""Shard format and ingestion: round trip, reading without extracting, shard names. Bad samples are in
tests/reliability/test_bad_input.py."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
from shardkit import good, png, write_tar

from gda.corpus.ingest import ingest_shard
from gda.corpus.shards import (
    ShardNameError,
    ShardReader,
    ShardSample,
    image_id,
    iter_image_bytes,
    list_shards,
    write_shard,
)


def test_write_read_round_trip(tmp_path: Path) -> None:
    samples = [
        ShardSample(
            key=f"00003{i:04d}",
            image=png(colour=(i, 2 * i, 3 * i)),
            image_ext="png",
            captions=[f"icon {i}", f"alt {i}"],
            meta={"url": f"u{i}", "license": "MIT"},
        )
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
    write_tar(
        tmp_path / "00001.tar",
        [("a.png", png(colour=colours["00001", "a"])), ("b.png", png(colour=colours["00001", "b"]))],
    )
    write_tar(tmp_path / "00002.tar", [("c.png", png(colour=colours["00002", "c"]))])
    rows = pl.DataFrame({"shard": ["00001", "00002", "00001"], "key": ["b", "c", "a"]})
    images = load_corpus_images(rows, lambda shard: tmp_path / f"{shard}.tar", 16)
    for position, (shard, key) in enumerate(zip(rows["shard"], rows["key"])):
        expected = torch.tensor(colours[shard, key], dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(images[position, :, 0, 0], expected)
