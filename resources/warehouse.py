"""The DuckDB warehouse: table creation from ``sql/schema.sql``, replacing a table's rows, and read-only queries.

Writes of asset outputs go through ``DuckDBPolarsIOManager`` (except ``replace_table``, for a table named
unlike its asset); this resource creates the declared tables first (so they carry the DDL's types and NOT
NULL constraints) and answers reads with read-only connections. DuckDB lets one process write a file and
then nobody else may open it, not even read-only: every connection here waits up to ``lock_wait_s`` for a
writer in another run to finish (the IO manager retries the same way), so runs of different pools that
touch DuckDB queue for a moment instead of failing on the lock.

With ``table_format: parquet`` the tables of ``PARQUET_TABLES`` (the teacher's, written per query batch by
GPU workers in parallel) are Parquet files, one per partition, written without DuckDB's lock by
``ParquetIOManager``; gda.duckdb then holds views named like them (``resources/parquet_io.py``).
"""

import logging
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import duckdb
import polars as pl

from gda import tables
from gda.connections import connect
from resources.duckdb_io import TransactionalDuckDBPolarsIOManager
from resources.parquet_io import (
    PARQUET_TABLES,
    SCHEMA_FILE,
    ParquetIOManager,
    ensure_schema_file,
    table_folder,
    view_sql,
    write_partition,
)
from sql import named_query

log = logging.getLogger(__name__)


class Warehouse(dg.ConfigurableResource):
    database: str
    lock_wait_s: float = 120.0
    # "parquet": PARQUET_TABLES are Parquet files, one per partition, with DuckDB views over them (many
    # writers at once); "duckdb": every table lives in the one file (one writer at a time).
    table_format: Literal["duckdb", "parquet"] = "duckdb"
    # Where the Parquet tables live; relative to the database's folder. Default: <home>/artifacts/tables.
    parquet_root: str = "artifacts/tables"

    @property
    def tables_root(self) -> Path:
        return (Path(self.database).resolve().parent / Path(self.parquet_root).expanduser()).resolve()

    @property
    def parquet_tables(self) -> tuple[str, ...]:
        return PARQUET_TABLES if self.table_format == "parquet" else ()

    def table_io_manager(self) -> ParquetIOManager | TransactionalDuckDBPolarsIOManager:
        """The IO manager of PARQUET_TABLES' assets (the ``batch_tables_io`` key) in this table format."""
        if self.table_format == "parquet":
            return ParquetIOManager(root=str(self.tables_root), tables=list(PARQUET_TABLES))
        return TransactionalDuckDBPolarsIOManager(database=self.database, schema=tables.SCHEMA)

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        return connect(Path(self.database), read_only=read_only, wait_s=self.lock_wait_s)

    def ensure_tables(self) -> None:
        """Create the declared tables (in parquet mode: views over Parquet for PARQUET_TABLES) in one
        transaction. A home that switched formats keeps its rows: a table's rows are written out as
        partition files before the table is dropped for its view; a view's rows are copied into the new
        table, and its folder is then renamed aside (``<table>.imported-<time>``), not deleted."""
        with self._connect(read_only=False) as con:
            con.begin()
            try:
                imported = self._switch_formats(con)
                tables.create_tables(con)
                for table in imported:
                    con.execute(f"INSERT INTO {tables.SCHEMA}.{table} SELECT * FROM {_import_name(table)}")
                    con.execute(f"DROP TABLE {_import_name(table)}")
                con.commit()
            except BaseException:
                con.rollback()
                raise
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        for table, folder in imported.items():
            if not folder.is_dir():
                continue
            if all(path.name == SCHEMA_FILE for path in folder.iterdir()):
                shutil.rmtree(folder)  # it held no rows
                continue
            aside = folder.with_name(f"{folder.name}.imported-{stamp}")
            folder.rename(aside)
            log.warning(
                f"{table}: rows copied from Parquet into gda.duckdb (table_format duckdb); files kept in {aside}"
            )

    def _switch_formats(self, con: duckdb.DuckDBPyConnection) -> dict[str, Path]:
        """Views for the Parquet tables (a stored table's rows written out first); a view left by parquet mode
        copied into a temp table and dropped. Returns the tables to fill from their temp copy, with the
        folder their view read."""
        kinds = dict(
            con.execute(
                "SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = ?", [tables.SCHEMA]
            ).fetchall()
        )
        imported: dict[str, Path] = {}
        for table in PARQUET_TABLES:
            qualified = f"{tables.SCHEMA}.{table}"
            if table in self.parquet_tables:
                if kinds.get(table) == "BASE TABLE":
                    self._export(con, table)
                    con.execute(f"DROP TABLE {qualified}")
                ensure_schema_file(self.tables_root, table)
                con.execute(view_sql(self.tables_root, table))
            elif kinds.get(table) == "VIEW":
                try:
                    con.execute(f"CREATE TEMP TABLE {_import_name(table)} AS SELECT * FROM {qualified}")
                except duckdb.Error as error:
                    raise RuntimeError(
                        f"{table} is a view over Parquet files (warehouse table_format was parquet) that could not be "
                        f"read into gda.duckdb ({error}); set table_format: parquet again, or DROP VIEW {table} to "
                        "start it empty"
                    ) from error
                imported[table] = _view_folder(con, table) or table_folder(self.tables_root, table)
                con.execute(f"DROP VIEW {qualified}")
        return imported

    def _export(self, con: duckdb.DuckDBPyConnection, table: str) -> None:
        """Write a stored table's rows as partition files (before it is dropped for its view)."""
        column = tables.partition_column(table)
        qualified = f"{tables.SCHEMA}.{table}"
        keys = [row[0] for row in con.execute(f"SELECT DISTINCT {column} FROM {qualified} ORDER BY 1").fetchall()]
        rows = 0
        for key in keys:
            frame = con.execute(f"SELECT * FROM {qualified} WHERE {column} = ?", [key]).pl()
            write_partition(self.tables_root, table, column, key, frame)
            rows += frame.height
        if rows:
            log.warning(
                f"{table}: {rows} rows moved from gda.duckdb to Parquet files in "
                f"{table_folder(self.tables_root, table)}"
            )

    def replace_table(self, table: str, frame: pl.DataFrame, partition: tuple[str, str] | None = None) -> None:
        """Replace every row of ``table`` (or, with ``partition`` = (column, key), the rows of that partition)
        with ``frame`` in one transaction, for tables written by an asset of another name, where the IO
        manager's table-per-asset convention does not apply. A Parquet table is replaced per partition only."""
        if table in self.parquet_tables:
            if partition is None:
                raise ValueError(f"{table} is kept as Parquet files per partition; replace it one partition at a time")
            write_partition(self.tables_root, table, *partition, frame)
            return
        where, params = (f"WHERE {partition[0]} = ?", [partition[1]]) if partition else ("", [])
        with self._connect(read_only=False) as con:
            con.register("incoming", frame)
            con.execute("BEGIN")
            con.execute(f"DELETE FROM {tables.SCHEMA}.{table} {where}", params)
            con.execute(f"INSERT INTO {tables.SCHEMA}.{table} BY NAME SELECT * FROM incoming")
            con.execute("COMMIT")

    def query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        with self._connect(read_only=True) as con:
            return con.execute(sql, params or []).pl()

    def named(self, name: str, params: list[Any] | None = None) -> pl.DataFrame:
        return self.query(named_query(name), params)


def _import_name(table: str) -> str:
    return f"gda_import_{table}"


def _view_folder(con: duckdb.DuckDBPyConnection, table: str) -> Path | None:
    """The folder whose Parquet files the view ``table`` reads, from its definition."""
    row = con.execute(
        "SELECT sql FROM duckdb_views() WHERE schema_name = ? AND view_name = ?", [tables.SCHEMA, table]
    ).fetchone()
    found = re.search(r"read_parquet\('(.*)/\*\.parquet'", row[0]) if row else None
    return Path(found.group(1).replace("''", "'")) if found else None
