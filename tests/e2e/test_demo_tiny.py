"""Whole-pipeline runs on the tiny profile, through the CLI, into a real home: rows, files, check results."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pytest

from gda import arrays
from gda.cli import main
from gda.home import Home
from gda_assets.factory import build_defs
from gda_assets.runner import open_instance, run_shards
from shardkit import good, png, write_tar


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    home = Home(tmp_path_factory.mktemp("home"))
    assert main(["demo", "--home", str(home.root), "--profile", "tiny"]) == 0
    return home


def _query(home: Home, sql: str) -> list[tuple]:
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_demo_fills_tables_and_feature_files(demo_home: Home) -> None:
    per_shard = dict(_query(demo_home, "SELECT shard, count(*) FROM training_images GROUP BY shard"))
    assert per_shard == {"00000": 120, "00001": 120}
    assert _query(demo_home, "SELECT count(*) FROM rejected_images") == [(0,)]
    for shard, rows in per_shard.items():
        ids = [r[0] for r in _query(demo_home, f"SELECT id FROM training_images WHERE shard = '{shard}' ORDER BY id")]
        for asset, dim in (("image_features", 1280), ("text_features", 384)):
            array = arrays.load(demo_home.artifacts / asset / f"{shard}.safetensors")
            assert array.values.shape == (rows, dim)
            assert array.ids.tolist() == ids
            assert np.isfinite(array.values).all()
    heldout = demo_home.artifacts / "demo_corpus" / "heldout_prompts.parquet"
    assert heldout.exists()


def test_demo_runs_are_recorded_with_passing_checks(demo_home: Home) -> None:
    instance = open_instance(demo_home)
    assert sorted(instance.get_dynamic_partitions("shards")) == ["00000", "00001"]
    runs = instance.get_runs()
    assert runs and all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("training_images"), "unique_ids")]
    )
    evaluation = next(iter(record.values())).event.dagster_event.event_specific_data
    assert evaluation.passed


def test_rematerialising_a_shard_replaces_exactly_its_rows(demo_home: Home) -> None:
    before = _query(demo_home, "SELECT id, sha256 FROM training_images ORDER BY id")
    instance = open_instance(demo_home)
    defs = build_defs(home=demo_home, profile="tiny")
    [report] = run_shards(instance, defs, "ingest_job", ["00001"])
    assert report.succeeded and report.accepted == 120
    assert _query(demo_home, "SELECT id, sha256 FROM training_images ORDER BY id") == before


def test_ingest_of_a_user_folder_records_rejections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "laion"
    write_tar(folder / "00010.tar", good("000100000") + [("000100001.png", b"garbage"), ("000100001.txt", b"x")])
    write_tar(folder / "00011.tar", good("000110000") + [("000110001.png", png())])
    home = tmp_path / "home"
    assert main(["ingest", "--shards", str(folder), "--home", str(home), "--profile", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert "00010" in printed and "00011" in printed
    home_ = Home(home)
    assert _query(home_, "SELECT shard, key, reason FROM rejected_images ORDER BY shard") == [
        ("00010", "000100001", "undecodable_image"),
        ("00011", "000110001", "missing_caption"),
    ]
    assert _query(home_, "SELECT key FROM training_images ORDER BY key") == [("000100000",), ("000110000",)]
    assert not (home_.shards / "00010.tar").exists()  # the user's shards are read in place, never copied
