"""A shard dropped into a materialized home flows through only its own partitions, the index adds it, and the
query service answers with its images: the sensor and automation ticks the daemon would run, in-process."""

from __future__ import annotations

import shutil

import dagster as dg
import duckdb
import pytest

from gda.corpus.icons import DemoCorpusSpec, build_demo_corpus
from gda.home import Home
from gda.profiles import profile_values
from gda.service import open_engine
from gda_assets.runner import absorb_new_shards, open_instance

PER_SHARD = {
    "training_images",
    "rejected_images",
    "image_features",
    "text_features",
    "training_gradients",
    "baseline_losses",
    "training_embeddings",
}


@pytest.fixture(scope="module")
def grown(demo_home: Home, tmp_path_factory: pytest.TempPathFactory) -> tuple[Home, list[str], list]:
    """A copy of the tiny demo home with a third shard dropped into its shards folder and absorbed."""
    home = Home(tmp_path_factory.mktemp("grown") / "home")
    shutil.copytree(demo_home.root, home.root, symlinks=True)
    spec = dict(profile_values("tiny")["demo_corpus_source"])
    spec.update(n_images=spec["n_images"] * 3 // 2, n_shards=3)  # same shard size, one shard more
    extra = tmp_path_factory.mktemp("extra")
    build_demo_corpus(extra / "shards", DemoCorpusSpec(**spec), extra / "heldout.parquet")
    for suffix in (".tar", ".parquet"):
        shutil.copy(extra / "shards" / f"00002{suffix}", home.shards)
    before = [run.run_id for run in open_instance(home).get_runs()]
    return home, before, absorb_new_shards(home, "tiny")


def test_only_the_new_shards_partitions_and_the_index_are_materialized(grown: tuple[Home, list[str], list]) -> None:
    home, before, absorbed = grown
    assert [(run.partition, set(run.assets), run.succeeded) for run in absorbed] == [
        ("00002", PER_SHARD, True),
        (None, {"attribution_index"}, True),
    ]
    instance = open_instance(home)
    assert sorted(instance.get_dynamic_partitions("shards")) == ["00000", "00001", "00002"]
    new_runs = [run for run in instance.get_runs() if run.run_id not in before]
    assert len(new_runs) == 2 and all(run.status == dg.DagsterRunStatus.SUCCESS for run in new_runs)
    materialized = set()
    for run in new_runs:
        for record in instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        ).records:
            event = record.event_log_entry.dagster_event
            materialized.add((event.asset_key.to_user_string(), event.partition))
    assert materialized == {(asset, "00002") for asset in PER_SHARD} | {("attribution_index", None)}

    index_event = instance.get_latest_materialization_event(dg.AssetKey("attribution_index"))
    assert index_event.asset_materialization.metadata["action"].value == "added 1 shards"
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("attribution_index"), "count_matches_embeddings")]
    )
    assert next(iter(check.values())).event.dagster_event.event_specific_data.passed

    # Nothing new to absorb: the next ticks request nothing.
    assert absorb_new_shards(home, "tiny") == []


def test_the_query_service_finds_the_new_shards_images(grown: tuple[Home, list[str], list]) -> None:
    home, _, _ = grown
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        new = con.execute("SELECT id, caption FROM training_images WHERE shard = '00002' ORDER BY id").fetchall()
        total = con.execute("SELECT count(*) FROM training_images").fetchone()[0]
    assert len(new) == 120 and total == 360
    with open_engine(home, "tiny") as engine:
        assert engine.index.manifest.count == 360
        for train_id, caption in new[:3]:
            _, image = engine.training_image(train_id)
            # A training image queried with its own caption has exactly its own features: it ranks itself first.
            answer = engine.attribute(image, caption, 3)
            assert answer.results[0].train_id == train_id


def test_incremental_benchmark_times_one_shard_against_a_rebuild(demo_home: Home) -> None:
    import bench

    result = bench.run("incremental", demo_home.root, "tiny")
    assert result["shards"] == 3 and result["images_per_shard"] == 120
    assert [run["partition"] for run in result["runs_for_new_shard"]] == ["00002", None]
    assert 0 < result["absorb_one_shard_s"] and 0 < result["rebuild_s"]
    assert result["ratio_shard_over_rebuild"] == pytest.approx(result["absorb_one_shard_s"] / result["rebuild_s"])
    assert "ratio" in bench.table(result)
    # The benchmark works on a copy: the home itself still has its two shards.
    assert sorted(p.name for p in demo_home.shards.glob("*.tar")) == ["00000.tar", "00001.tar"]
