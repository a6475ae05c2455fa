"""The DuckDB warehouse: table creation from ``sql/schema.sql`` and read-only queries.

Writes of asset outputs go through ``DuckDBPolarsIOManager`` (except ``replace_table``, for a table named
unlike its asset); this resource creates the declared tables first (so they carry the DDL's types and NOT NULL constraints) and answers reads with read-only
connections, which never take the single writer lock.
"""


from typing import Any

import dagster as dg
import duckdb
import polars as pl

from gda import tables
from sql import named_query


class Warehouse(dg.ConfigurableResource):
    database: str

    def ensure_tables(self) -> None:
        with duckdb.connect(self.database) as con:
            tables.create_tables(con)

    def replace_table(self, table: str, frame: pl.DataFrame, partition: tuple[str, str] | None = None) -> None:
        """Replace every row of ``table`` (or, with ``partition`` = (column, key), the rows of that partition)
        with ``frame`` in one transaction, for tables written by an asset of another name, where the IO
        manager's table-per-asset convention does not apply."""
        where, params = (f"WHERE {partition[0]} = ?", [partition[1]]) if partition else ("", [])
        with duckdb.connect(self.database) as con:
            con.register("incoming", frame)
            con.execute("BEGIN")
            con.execute(f"DELETE FROM {tables.SCHEMA}.{table} {where}", params)
            con.execute(f"INSERT INTO {tables.SCHEMA}.{table} BY NAME SELECT * FROM incoming")
            con.execute("COMMIT")

    def query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        with duckdb.connect(self.database, read_only=True) as con:
            return con.execute(sql, params or []).pl()

    def named(self, name: str, params: list[Any] | None = None) -> pl.DataFrame:
        return self.query(named_query(name), params)
