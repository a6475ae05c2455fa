"""The icon demo corpus: deterministic shards, caption grammar, held-out prompts, palette detector."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from gda.corpus import icons
from gda.corpus.icons import DemoCorpusSpec, DemoCorpusSummary, build_demo_corpus
from gda.corpus.palette import (
    COLOUR_NAMES,
    LOW_CONTRAST_PARTNER,
    PALETTE,
    allowed_backgrounds,
    detect_colours,
    nearest_colour,
)
from gda.corpus.shards import RawEntry, ShardReader

TINY = DemoCorpusSpec(n_images=240, n_shards=2, resolution=16, seed=0, n_heldout_prompts=64)


def _build(root: Path, spec: DemoCorpusSpec) -> DemoCorpusSummary:
    return build_demo_corpus(root / "shards", spec, root / "queries" / "heldout.parquet")


def _entries(summary: DemoCorpusSummary) -> list[RawEntry]:
    entries: list[RawEntry] = []
    for path in summary.shards:
        reader = ShardReader(path)
        entries.extend(reader)
        assert reader.read_error is None
    return entries


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> DemoCorpusSummary:
    return _build(tmp_path_factory.mktemp("tiny"), TINY)


@pytest.fixture(scope="module")
def tiny_entries(tiny: DemoCorpusSummary) -> list[RawEntry]:
    return _entries(tiny)


def _written_files(summary: DemoCorpusSummary) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in summary.shards}
    files |= {p.with_suffix(".parquet").name: p.with_suffix(".parquet").read_bytes() for p in summary.shards}
    files["heldout"] = summary.heldout_path.read_bytes()
    return files


def test_same_seed_writes_identical_bytes_and_another_seed_does_not(tiny: DemoCorpusSummary, tmp_path: Path) -> None:
    again = _build(tmp_path / "again", TINY)
    assert _written_files(again) == _written_files(tiny)

    other = _build(tmp_path / "other", DemoCorpusSpec(240, 2, 16, seed=1, n_heldout_prompts=64))
    for path, other_path in zip(tiny.shards, other.shards, strict=True):
        assert path.read_bytes() != other_path.read_bytes()


def test_shards_hold_the_requested_samples(tiny: DemoCorpusSummary, tiny_entries: list[RawEntry]) -> None:
    assert tiny.n_images == TINY.n_images
    assert [p.name for p in tiny.shards] == ["00000.tar", "00001.tar"]
    for number, path in enumerate(tiny.shards):
        keys = [entry.key for entry in ShardReader(path)]
        assert len(keys) == TINY.n_images // TINY.n_shards
        assert keys == [f"{number:05d}{i:04d}" for i in range(len(keys))]
        table = pl.read_parquet(path.with_suffix(".parquet"))
        assert table["key"].to_list() == keys

    urls = set()
    for entry in tiny_entries:
        assert set(entry.files) == {"png", "txt", "json"}
        assert not entry.truncated and not entry.repeated_members
        captions = entry.files["txt"].decode("utf-8").split("\n")
        assert 2 <= len(captions) <= 5
        assert all(caption.strip() == caption and caption for caption in captions)
        image = Image.open(io.BytesIO(entry.files["png"]))
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == (TINY.resolution, TINY.resolution)
        meta = json.loads(entry.files["json"])
        assert meta["width"] == meta["height"] == TINY.resolution
        assert meta["license"] == {"mdi6": "Apache-2.0", "fa6s": "CC-BY-4.0"}[meta["font"]]
        assert meta["url"].startswith(f"https://icons.example/{meta['font']}/{meta['icon']}.png?")
        assert meta["fg"] in allowed_backgrounds(meta["bg"])
        assert meta["scale"] in icons.SCALES and meta["position"] in icons.POSITIONS
        assert meta["scale"] == "small" or meta["position"] == "centre"
        assert meta["icon"].replace("-", " ") in captions[0]
        assert meta["fg"] in captions[0] and meta["bg"] in captions[0]
        urls.add(meta["url"])
    # The URL spells out every attribute, so distinct URLs mean no image is an exact repeat.
    assert len(urls) == TINY.n_images


def test_corpus_is_drawn_by_families_with_near_duplicates(
    tiny: DemoCorpusSummary, tiny_entries: list[RawEntry]
) -> None:
    metas = [json.loads(entry.files["json"]) for entry in tiny_entries]
    members: dict[str, set[str]] = {}
    for meta in metas:
        assert meta["icon"] == meta["family"] or meta["icon"].startswith(meta["family"] + "-")
        members.setdefault(meta["family"], set()).add(meta["icon"])
    assert len(members) == tiny.n_families == TINY.n_images // icons.IMAGES_PER_FAMILY
    assert sum(len(names) for names in members.values()) == tiny.n_icons
    assert all(2 <= len(names) <= 1 + icons.MAX_VARIANTS_PER_FAMILY for names in members.values())


def test_every_colour_is_used_as_foreground_and_background(tiny_entries: list[RawEntry]) -> None:
    metas = [json.loads(entry.files["json"]) for entry in tiny_entries]
    assert {meta["fg"] for meta in metas} == set(COLOUR_NAMES)
    assert {meta["bg"] for meta in metas} == set(COLOUR_NAMES)


def test_small_icons_sit_in_their_named_corner(tiny_entries: list[RawEntry]) -> None:
    checked = 0
    for entry in tiny_entries:
        meta = json.loads(entry.files["json"])
        pixels = np.asarray(Image.open(io.BytesIO(entry.files["png"])), dtype=np.int32)
        ink = np.abs(pixels - np.array(PALETTE[meta["bg"]])).sum(axis=2) > 60
        rows, cols = np.nonzero(ink)
        assert len(rows) > 0
        if meta["scale"] != "small" or meta["position"] == "centre":
            continue
        vertical, horizontal = meta["position"].split("-")
        half = TINY.resolution / 2
        assert (rows.mean() < half) == (vertical == "top")
        assert (cols.mean() < half) == (horizontal == "left")
        checked += 1
    assert checked > 0


def test_heldout_prompts_follow_the_grammar_but_are_never_training_captions(
    tiny: DemoCorpusSummary, tiny_entries: list[RawEntry]
) -> None:
    assert tiny.heldout_path.parent != tiny.shards[0].parent
    heldout = pl.read_parquet(tiny.heldout_path)
    assert heldout.height == tiny.n_heldout == TINY.n_heldout_prompts
    assert {"prompt_id", "prompt", "icon", "family", "fg", "bg", "scale", "position"} <= set(heldout.columns)
    assert heldout["prompt_id"].to_list() == list(range(heldout.height))
    assert heldout["prompt"].n_unique() == heldout.height

    training_captions = {c for entry in tiny_entries for c in entry.files["txt"].decode("utf-8").split("\n")}
    training_icons = {json.loads(entry.files["json"])["icon"] for entry in tiny_entries}
    assert not set(heldout["prompt"].to_list()) & training_captions
    for row in heldout.iter_rows(named=True):
        assert row["icon"] in training_icons
        assert row["icon"].replace("-", " ") in row["prompt"] or row["icon"] in row["prompt"]
        assert row["fg"] in row["prompt"] and row["fg"] in allowed_backgrounds(row["bg"])


@pytest.mark.parametrize("resolution", [16, 32])
def test_detector_recovers_rendered_colours(resolution: int, tiny_entries: list[RawEntry], tmp_path: Path) -> None:
    if resolution == TINY.resolution:
        entries = tiny_entries
    else:
        entries = _entries(_build(tmp_path, DemoCorpusSpec(120, 1, resolution, seed=3, n_heldout_prompts=0)))
    hits = 0
    for entry in entries:
        meta = json.loads(entry.files["json"])
        image = Image.open(io.BytesIO(entry.files["png"]))
        hits += detect_colours(image) == (meta["fg"], meta["bg"])
    assert hits / len(entries) >= 0.95


def test_detector_accepts_arrays_and_tolerates_noise() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((16, 16, 3)) + PALETTE["green"]
    image[4:12, 6:10] = PALETTE["yellow"]
    noisy = np.clip(image + rng.normal(0, 12, image.shape), 0, 255)
    assert detect_colours(image) == ("yellow", "green")
    assert detect_colours(noisy) == ("yellow", "green")


def test_palette_is_eight_separated_colours_with_uniform_pairings() -> None:
    assert len(COLOUR_NAMES) == 8
    for name, rgb in PALETTE.items():
        assert nearest_colour(rgb) == name
        assert nearest_colour(np.clip(np.array(rgb) + 20, 0, 255)) == name
        assert LOW_CONTRAST_PARTNER[LOW_CONTRAST_PARTNER[name]] == name != LOW_CONTRAST_PARTNER[name]
        # Six partners for every colour keeps the background marginal at exactly 1/8.
        assert len(allowed_backgrounds(name)) == 6
        assert name not in allowed_backgrounds(name)
    for fg, bg in itertools.permutations(COLOUR_NAMES, 2):
        if bg in allowed_backgrounds(fg):
            assert np.linalg.norm(np.subtract(PALETTE[fg], PALETTE[bg])) > 100


def test_rejects_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside the shard folder"):
        build_demo_corpus(tmp_path / "shards", TINY, tmp_path / "shards" / "heldout.parquet")
    with pytest.raises(ValueError, match="resolution"):
        _build(tmp_path, DemoCorpusSpec(10, 1, 24, 0, 0))
    with pytest.raises(ValueError, match="n_shards"):
        _build(tmp_path, DemoCorpusSpec(10, 20, 16, 0, 0))


def test_missing_qtawesome_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps qtawesome"):
        icons._font_dir()
