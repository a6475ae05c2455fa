"""The teacher's per-batch tables as partitioned Parquet (warehouse ``table_format: parquet``): one file per
partition written atomically, DuckDB views named like the tables for queries and checks, and a home that
switches formats keeps its rows."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from gda import parquet_files, tables
from gda.home import Home
from gda.profiles import profile_values
from gda_assets import factory
from gda_assets.checks import table_check_specs
from gda_assets.runner import open_instance
from resources import ParquetIOManager, TransactionalDuckDBPolarsIOManager, Warehouse, parquet_io

REPO = Path(__file__).resolve().parents[2]
BATCH = "train-001"


def _scores(batch: str, score: float, n: int = 3) -> pl.DataFrame:
    return tables.conform(
        "abu_scores",
        pl.DataFrame(
            {"query_id": list(range(n)), "train_id": list(range(10, 10 + n)), "rank": list(range(n))}
        ).with_columns(
            batch=pl.lit(batch),
            score=pl.lit(score),
            n_candidates=pl.lit(n),
            mode=pl.lit("first_order"),
            model_version=pl.lit("m"),
            factors_version=pl.lit("f"),
            config_hash=pl.lit("c"),
        ),
    )


def _hidden(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def _kinds(warehouse: Warehouse) -> dict[str, str]:
    rows = warehouse.query(
        "SELECT table_name, table_type FROM information_schema.tables WHERE table_name IN ('abu_scores', "
        "'dino_candidates')"
    ).rows()
    return dict(rows)


# The writer on its own.


def test_a_failed_rename_leaves_the_previous_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "abu_scores" / "batch=a.parquet"
    parquet_files.write_parquet_atomically(_scores("a", 1.0), path)
    before = path.read_bytes()

    def fail(source: Path, target: Path) -> None:
        assert source.exists() and source.parent == target.parent  # the new file was written in full, next to it
        raise OSError("disk went away")

    monkeypatch.setattr(parquet_files, "_replace", fail)
    with pytest.raises(OSError, match="disk went away"):
        parquet_files.write_parquet_atomically(_scores("a", 2.0), path)
    assert path.read_bytes() == before
    assert _hidden(path.parent) == []


KILL_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import polars as pl
    from gda import parquet_files
    parquet_files._replace = lambda source, target: os.kill(os.getpid(), signal.SIGKILL)
    parquet_files.write_parquet_atomically(pl.DataFrame({"x": [9, 9, 9]}), Path(sys.argv[1]))
    """
)


def test_a_writer_killed_before_the_rename_leaves_the_previous_file_readable(tmp_path: Path) -> None:
    path = tmp_path / "t" / "batch=a.parquet"
    parquet_files.write_parquet_atomically(pl.DataFrame({"x": [1, 2]}), path)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_WRITER, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert pl.read_parquet(path)["x"].to_list() == [1, 2]
    [temp] = _hidden(path.parent)  # the killed writer's full temp file, which no *.parquet glob matches
    assert temp.endswith(".tmp")
    assert duckdb.sql(f"SELECT sum(x) FROM read_parquet('{path.parent}/*.parquet')").fetchone() == (3,)


# The warehouse's views, and switching formats.


def test_views_stand_in_for_the_tables_and_a_switch_keeps_every_row(tmp_path: Path) -> None:
    database = str(tmp_path / "gda.duckdb")
    in_duckdb, in_parquet = Warehouse(database=database), Warehouse(database=database, table_format="parquet")
    assert isinstance(in_duckdb.table_io_manager(), TransactionalDuckDBPolarsIOManager)
    assert isinstance(in_parquet.table_io_manager(), ParquetIOManager)
    in_duckdb.ensure_tables()
    rows = pl.concat([_scores("a", 1.0), _scores("b", 2.0)])
    in_duckdb.replace_table("abu_scores", rows)

    in_parquet.ensure_tables()  # the stored rows go out as partition files before the table becomes a view
    root = tmp_path / "artifacts" / "tables"
    assert in_parquet.tables_root == root
    assert _kinds(in_parquet) == {"abu_scores": "VIEW", "dino_candidates": "VIEW"}
    assert sorted(p.name for p in (root / "abu_scores").iterdir()) == [
        "_schema.parquet",
        "batch=a.parquet",
        "batch=b.parquet",
    ]
    assert in_parquet.query("SELECT * FROM abu_scores ORDER BY batch, query_id").equals(rows)
    # No files yet: the zero-row schema file gives the view its declared columns.
    assert in_parquet.query("SELECT count(*) FROM dino_candidates").item() == 0
    declared = [(c.name, c.type) for c in tables.columns("dino_candidates")]
    assert (
        in_parquet.query(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'dino_candidates' ORDER BY "
            "column_index"
        ).rows()
        == declared
    )
    in_parquet.replace_table("abu_scores", _scores("b", 3.0), ("batch", "b"))
    in_parquet.ensure_tables()  # idempotent
    expected = pl.concat([_scores("a", 1.0), _scores("b", 3.0)])
    assert in_parquet.query("SELECT * FROM abu_scores ORDER BY batch, query_id").equals(expected)

    in_duckdb.ensure_tables()  # and back: the view's rows are copied into the table, the files moved aside
    assert _kinds(in_duckdb) == {"abu_scores": "BASE TABLE", "dino_candidates": "BASE TABLE"}
    assert in_duckdb.query("SELECT * FROM abu_scores ORDER BY batch, query_id").equals(expected)
    assert [p.name.split(".imported-")[0] for p in root.iterdir()] == ["abu_scores"]  # dino_candidates had no rows
    with pytest.raises(duckdb.ConstraintException):  # the table has the DDL's NOT NULL constraints again
        in_duckdb.replace_table("abu_scores", expected.with_columns(score=pl.lit(None, pl.Float64)))


# The assets, materialized with the parquet setting in a copy of the tiny demo home.


@pytest.fixture
def parquet_home(demo_home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    """A copy of the tiny demo (its tables in DuckDB) whose profile asks for Parquet tables, as a profile's
    ``warehouse`` values do."""
    home = Home(tmp_path / "home")
    shutil.copytree(demo_home.root, home.root, symlinks=True)
    values = {**profile_values("tiny"), "warehouse": {"table_format": "parquet"}}
    monkeypatch.setattr(factory, "profile_values", lambda profile: values)
    return home


def _materialize(home: Home, assets: list[str], partition: str) -> dg.ExecuteInProcessResult:
    keys = [dg.AssetKey(name) for name in assets]
    job = factory.build_defs(home=home, profile="tiny").resolve_implicit_job_def_def_for_assets(keys)
    return job.execute_in_process(
        instance=open_instance(home), partition_key=partition, asset_selection=keys, raise_on_error=False
    )


def _files(home: Home, table: str) -> pl.DataFrame:
    """An independent read of a table's partition files."""
    paths = sorted((home.artifacts / "tables" / table).glob("batch=*.parquet"))
    return pl.concat([pl.read_parquet(path) for path in paths])


def _view(home: Home, table: str) -> pl.DataFrame:
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        return con.execute(f"SELECT * FROM {table}").pl()


def test_assets_write_partition_files_that_the_views_queries_and_checks_read(
    parquet_home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = parquet_home
    defs = factory.build_defs(home=home, profile="tiny")
    assert isinstance(defs.resources["batch_tables_io"], ParquetIOManager)
    before = {table: _view(home, table).sort(pl.all()) for table in parquet_io.PARQUET_TABLES}
    batches = sorted(before["abu_scores"]["batch"].unique())
    assert BATCH in batches

    result = _materialize(home, ["dino_candidates", "abu_scores"], BATCH)
    assert result.success
    folder = home.artifacts / "tables"
    for table in parquet_io.PARQUET_TABLES:
        # Every batch's rows moved out of gda.duckdb into its own file; the views return exactly the files' rows.
        assert sorted(p.name for p in (folder / table).iterdir()) == ["_schema.parquet"] + [
            f"batch={b}.parquet" for b in batches
        ]
        view, files = _view(home, table), _files(home, table)
        assert view.schema == tables.polars_schema(table)
        assert view.sort(pl.all()).equals(files.sort(pl.all()))
        assert view.height == before[table].height
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        kinds = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
    assert kinds["abu_scores"] == kinds["dino_candidates"] == "VIEW"
    # dino_candidates is deterministic: the re-materialized batch holds the rows it held in DuckDB.
    assert _view(home, "dino_candidates").sort(pl.all()).equals(before["dino_candidates"])
    written = pl.read_parquet(folder / "abu_scores" / f"batch={BATCH}.parquet")
    assert written["batch"].unique().to_list() == [BATCH] and written.height > 0

    # Every table check (blocking, over the views) passed, and the named queries read the views.
    evaluations = {(e.asset_key.to_user_string(), e.check_name): e.passed for e in result.get_asset_check_evaluations()}
    for table in parquet_io.PARQUET_TABLES:
        for spec in table_check_specs(table):
            assert evaluations[(table, spec.name)], (table, spec.name)
    warehouse = defs.resources["warehouse"]
    test_rows = warehouse.named("test_rankings")
    assert test_rows.height == before["abu_scores"].filter(pl.col("batch").str.starts_with("test")).height
    assert warehouse.named("batch_candidates", [BATCH]).height > 0

    # Re-materializing a partition replaces its file: no duplicated rows.
    candidates = _view(home, "dino_candidates")
    assert _materialize(home, ["dino_candidates"], BATCH).success
    again = _view(home, "dino_candidates")
    assert again.sort(pl.all()).equals(candidates.sort(pl.all()))
    assert again.filter(pl.col("batch") == BATCH).select("query_id", "train_id", "kind").is_duplicated().sum() == 0

    # A write that fails after its temp file is complete leaves the previous file, and the view, as they were.
    path = folder / "dino_candidates" / f"batch={BATCH}.parquet"
    stored = path.read_bytes()

    def fail(source: Path, target: Path) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr(parquet_files, "_replace", fail)
    failed = _materialize(home, ["dino_candidates"], BATCH)
    [failure] = failed.get_step_failure_events()
    assert "killed mid-write" in failure.step_failure_data.error.to_string()
    assert path.read_bytes() == stored
    assert _hidden(folder / "dino_candidates") == []
    assert _view(home, "dino_candidates").sort(pl.all()).equals(candidates.sort(pl.all()))
