"""The DuckDB warehouse: table creation from ``sql/schema.sql`` and read-only queries.

Writes of asset outputs go through ``DuckDBPolarsIOManager``; this resource creates the declared tables
first (so they carry the DDL's types and NOT NULL constraints) and answers reads with read-only
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

    def query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        with duckdb.connect(self.database, read_only=True) as con:
            return con.execute(sql, params or []).pl()

    def named(self, name: str, params: list[Any] | None = None) -> pl.DataFrame:
        return self.query(named_query(name), params)
