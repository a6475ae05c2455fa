"""Crash safety: each writer killed (SIGKILL) at its critical moment, in a real materialization of the tiny
demo home, leaves the previous materialization readable and unchanged; the runner settles the dead run and
frees its pool slot; a normal re-run completes with no duplicated or missing rows and no temp files left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl

from gda import arrays
from gda.attribution_index import INDEX_FILE, load_index
from gda.embedder import load_embedder
from gda.home import Home
from gda.service import open_engine
from gda_assets.factory import build_defs
from gda_assets.runner import open_instance

REPO = Path(__file__).resolve().parents[2]

# Materializes ASSETS (comma-separated) for PARTITION through the runner's instance, dying by SIGKILL at
# KILL_AT: "table" is inside the IO manager, after it deleted the partition's rows and before it inserts the
# new ones; a path is the moment a finished temp file or symlink is about to be renamed onto it.
KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    import dagster as dg
    from dagster_duckdb_polars import DuckDBPolarsTypeHandler

    from gda.home import Home
    from gda_assets.factory import build_defs
    from gda_assets.runner import open_instance

    root, assets, partition, kill_at = sys.argv[1:]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "table":
        DuckDBPolarsTypeHandler.handle_output = lambda *args, **kwargs: die()
    else:
        rename = os.replace
        def replace(src, dst, *args, **kwargs):
            if Path(dst) == Path(kill_at):
                die()
            rename(src, dst, *args, **kwargs)
        os.replace = replace

    home = Home(Path(root))
    keys = [dg.AssetKey(name) for name in assets.split(",")]
    job = build_defs(home=home, profile="tiny").resolve_implicit_job_def_def_for_assets(keys)
    job.execute_in_process(instance=open_instance(home), partition_key=partition or None, asset_selection=keys)
    sys.exit("the run finished without reaching the kill point")
    """
)


def copy_home(demo_home: Home, tmp_path: Path) -> Home:
    home = Home(tmp_path / "home")
    shutil.copytree(demo_home.root, home.root, symlinks=True)
    return home


def run_killed(home: Home, assets: list[str], partition: str | None, kill_at: str | Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(home.root), ",".join(assets), partition or "", str(kill_at)],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def slots_held(instance: dg.DagsterInstance, run_id: str) -> set[str]:
    storage = instance.event_log_storage
    return {
        pool
        for pool in storage.get_concurrency_keys()
        if any(slot.run_id == run_id for slot in storage.get_concurrency_info(pool).claimed_slots)
    }


def settle_killed_run(home: Home, pool: str | None) -> dg.DagsterInstance:
    """The killed run is left STARTED holding its pool's slot; opening the home through the runner marks it
    failed and frees the slot (else the re-run would wait for that slot forever)."""
    before = dg.DagsterInstance.from_config(str(home.dagster_home))
    started = before.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    assert len(started) == 1
    run_id = started[0].run_id
    assert slots_held(before, run_id) == ({pool} if pool else set())
    instance = open_instance(home)
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert slots_held(instance, run_id) == set()
    return instance


def rerun(instance: dg.DagsterInstance, home: Home, assets: list[str], partition: str | None) -> None:
    keys = [dg.AssetKey(name) for name in assets]
    job = build_defs(home=home, profile="tiny").resolve_implicit_job_def_def_for_assets(keys)
    result = job.execute_in_process(
        instance=instance, partition_key=partition, asset_selection=keys, raise_on_error=False
    )
    assert result.success


def partition_rows(home: Home, table: str, column: str, key: str) -> pl.DataFrame:
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        return con.execute(f"SELECT * FROM {table} WHERE {column} = ? ORDER BY ALL", [key]).pl()


def partition_counts(home: Home, table: str, column: str, unique: str) -> dict[str, tuple[int, int]]:
    """Per partition: rows, and distinct values of the columns ``unique`` that identify a row."""
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        rows = con.execute(
            f"SELECT {column}, count(*), count(DISTINCT ({unique})) FROM {table} GROUP BY ALL"
        ).fetchall()
    return {key: (count, distinct) for key, count, distinct in rows}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def leftovers(home: Home) -> list[str]:
    """Hidden entries under the artifact root (temp files, staging or superseded folders), other than the
    version folders that published names link to."""
    published = {os.readlink(path) for path in home.artifacts.iterdir() if path.is_symlink()}
    return sorted(
        str(path.relative_to(home.artifacts)) for path in home.artifacts.rglob(".*") if path.name not in published
    )


def assert_serves(home: Home) -> None:
    """The query service opens the home and answers a test query from the index."""
    with open_engine(home, profile="tiny") as engine:
        assert engine.refusal is None
        query = next(iter(engine.test_queries.values()))
        answer = engine.attribute(query.image.read_bytes(), query.prompt, top_k=3)
        assert len(answer.results) == 3


def test_killed_between_delete_and_insert_keeps_the_shards_rows(demo_home: Home, tmp_path: Path) -> None:
    home = copy_home(demo_home, tmp_path)
    tables = {"training_images": "id", "rejected_images": "key"}
    before = {table: partition_rows(home, table, "shard", "00001") for table in tables}
    counts = {table: partition_counts(home, table, "shard", unique) for table, unique in tables.items()}
    assert before["training_images"].height > 0

    run_killed(home, list(tables), "00001", "table")

    for table in tables:
        assert partition_rows(home, table, "shard", "00001").equals(before[table])
    assert_serves(home)
    rerun(settle_killed_run(home, "duckdb"), home, list(tables), "00001")
    for table, unique in tables.items():
        assert partition_counts(home, table, "shard", unique) == counts[table]
        assert partition_rows(home, table, "shard", "00001").equals(before[table])


def test_killed_before_the_features_file_is_renamed_keeps_the_old_file(demo_home: Home, tmp_path: Path) -> None:
    home = copy_home(demo_home, tmp_path)
    path = home.artifacts / "image_features" / "00001.safetensors"
    before, ids = path.read_bytes(), arrays.load(path).ids
    assert leftovers(home) == []

    run_killed(home, ["image_features"], "00001", path)

    assert path.read_bytes() == before
    assert leftovers(home) == ["image_features/.00001.safetensors.tmp"]  # written in full, never renamed
    assert_serves(home)
    rerun(settle_killed_run(home, "gpu"), home, ["image_features"], "00001")
    assert arrays.load(path).ids.tolist() == ids.tolist()
    assert leftovers(home) == []


def test_killed_between_delete_and_insert_keeps_the_batchs_scores(demo_home: Home, tmp_path: Path) -> None:
    home = copy_home(demo_home, tmp_path)
    unique = "query_id, train_id"
    before = partition_rows(home, "abu_scores", "batch", "train-001")
    counts = partition_counts(home, "abu_scores", "batch", unique)
    assert before.height > 0

    run_killed(home, ["abu_scores"], "train-001", "table")

    assert partition_rows(home, "abu_scores", "batch", "train-001").equals(before)
    rerun(settle_killed_run(home, "gpu"), home, ["abu_scores"], "train-001")
    assert partition_counts(home, "abu_scores", "batch", unique) == counts


def test_killed_before_the_embedder_is_swapped_in_keeps_the_old_folder(demo_home: Home, tmp_path: Path) -> None:
    home = copy_home(demo_home, tmp_path)
    folder = home.artifacts / "attribution_embedder"
    before = folder_bytes(folder)
    assert folder.is_symlink() and leftovers(home) == []

    run_killed(home, ["attribution_embedder"], None, folder)

    assert folder_bytes(folder) == before
    assert leftovers(home)  # the killed run's finished version folder and its symlink, never swapped in
    assert_serves(home)
    rerun(settle_killed_run(home, "gpu"), home, ["attribution_embedder"], None)
    assert folder.is_symlink() and sorted(folder_bytes(folder)) == sorted(before)
    assert leftovers(home) == []


def test_killed_while_moving_a_pre_symlink_folder_aside_recovers_it(demo_home: Home, tmp_path: Path) -> None:
    """A home written before folders were symlinks: the first publish moves the real folder aside, and a
    kill right after is undone by the next run."""
    home = copy_home(demo_home, tmp_path)
    folder = home.artifacts / "attribution_embedder"
    version = home.artifacts / os.readlink(folder)
    folder.unlink()
    version.rename(folder)
    before = folder_bytes(folder)

    run_killed(home, ["attribution_embedder"], None, folder)

    assert folder_bytes(home.artifacts / ".attribution_embedder.previous") == before
    rerun(settle_killed_run(home, "gpu"), home, ["attribution_embedder"], None)
    assert folder.is_symlink() and sorted(folder_bytes(folder)) == sorted(before)
    assert leftovers(home) == []
    assert load_embedder(folder).version


def test_killed_before_the_index_is_renamed_keeps_the_old_index(demo_home: Home, tmp_path: Path) -> None:
    home = copy_home(demo_home, tmp_path)
    path = home.artifacts / "attribution_index" / INDEX_FILE
    before = path.read_bytes()
    manifest = load_index(path).manifest

    run_killed(home, ["attribution_index"], None, path)

    assert path.read_bytes() == before
    assert_serves(home)
    rerun(settle_killed_run(home, None), home, ["attribution_index"], None)
    rebuilt = load_index(path)
    assert (
        rebuilt.faiss_index.ntotal == manifest.count == sum(entry.count for entry in rebuilt.manifest.shards.values())
    )
    assert rebuilt.manifest.shards == manifest.shards
    assert leftovers(home) == []
