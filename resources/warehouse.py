"""The DuckDB warehouse: table creation from ``sql/schema.sql``, replacing a table's rows, and read-only queries.

Writes of asset outputs go through ``DuckDBPolarsIOManager`` (except ``replace_table``, for a table named
unlike its asset); this resource creates the declared tables first (so they carry the DDL's types and NOT
NULL constraints) and answers reads with read-only connections. DuckDB lets one process write a file and
then nobody else may open it, not even read-only: every connection here waits up to ``lock_wait_s`` for a
writer in another run to finish (the IO manager retries the same way), so runs of different pools that
touch DuckDB queue for a moment instead of failing on the lock.
"""


from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import polars as pl

from gda import tables
from gda.connections import connect
from sql import named_query


class Warehouse(dg.ConfigurableResource):
    database: str
    lock_wait_s: float = 120.0

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        return connect(Path(self.database), read_only=read_only, wait_s=self.lock_wait_s)

    def ensure_tables(self) -> None:
        with self._connect(read_only=False) as con:
            tables.create_tables(con)

    def replace_table(self, table: str, frame: pl.DataFrame, partition: tuple[str, str] | None = None) -> None:
        """Replace every row of ``table`` (or, with ``partition`` = (column, key), the rows of that partition)
        with ``frame`` in one transaction, for tables written by an asset of another name, where the IO
        manager's table-per-asset convention does not apply."""
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
