"""Table schemas derived from the one DDL source, ``sql/schema.sql``.

DuckDB itself parses the DDL (into an in-memory database), so the column names, types and NOT NULL flags
that the warehouse enforces are exactly the ones used to cast asset outputs and to describe columns in
the UI; nothing is declared twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import duckdb
import polars as pl

from sql import schema_sql

# The DuckDB schema every table lives in. Not "gda": the file is gda.duckdb, so its catalog is already
# called gda, and a schema of that name makes every "gda.x" reference ambiguous.
SCHEMA = "main"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool
    description: str


@cache
def _catalog() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute(schema_sql())
    return con


def _column_comments(table: str) -> dict[str, str]:
    """The trailing ``-- text`` of each column line in the table's CREATE statement: its description."""
    block = re.search(rf"CREATE TABLE IF NOT EXISTS {table} \((.*?)\n\);", schema_sql(), flags=re.DOTALL)
    if block is None:
        return {}
    found = re.findall(r"^\s+(\w+)\s[^\n]*?--\s*(.+)$", block.group(1), flags=re.MULTILINE)
    return {name: text.strip() for name, text in found}


@cache
def columns(table: str) -> tuple[Column, ...]:
    rows = (
        _catalog()
        .execute(
            "SELECT column_name, data_type, is_nullable FROM duckdb_columns() WHERE table_name = ? "
            "ORDER BY column_index",
            [table],
        )
        .fetchall()
    )
    if not rows:
        raise KeyError(f"table {table!r} is not declared in sql/schema.sql")
    comments = _column_comments(table)
    return tuple(Column(name, dtype, nullable, comments.get(name, "")) for name, dtype, nullable in rows)


@cache
def partition_column(table: str) -> str | None:
    """The column whose DDL comment starts with "partition key" (the key a partitioned asset writes by)."""
    found = [c.name for c in columns(table) if c.description.startswith("partition key")]
    return found[0] if found else None


def table_names() -> list[str]:
    return [
        row[0] for row in _catalog().execute("SELECT table_name FROM duckdb_tables() ORDER BY table_name").fetchall()
    ]


@cache
def polars_schema(table: str) -> pl.Schema:
    """The polars schema whose Arrow form DuckDB stores as the declared column types."""
    return _catalog().execute(f"SELECT * FROM {table} LIMIT 0").pl().schema


def conform(table: str, frame: pl.DataFrame) -> pl.DataFrame:
    """Select and cast ``frame`` to the declared columns, in storage order; a missing column is an error."""
    schema = polars_schema(table)
    missing = [name for name in schema.names() if name not in frame.columns]
    if missing:
        raise ValueError(f"{table}: frame lacks declared columns {missing}")
    return frame.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])


class SchemaMismatch(RuntimeError):
    """A stored table's columns differ from sql/schema.sql (made by an older gda)."""


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create every declared table (if missing) in ``con``. A stored table that lacks only nullable columns
    declared after its own gets them (NULL in its rows: a newer gda added a setting); one whose columns
    differ otherwise is refused, since guessing how to convert its rows could lose them."""
    con.execute(schema_sql())
    for table in table_names():
        stored = con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = ? AND table_name = ? "
            "ORDER BY column_index",
            [SCHEMA, table],
        ).fetchall()
        declared = [(c.name, c.type) for c in columns(table)]
        added = columns(table)[len(stored) :]
        if stored == declared[: len(stored)] and all(c.nullable for c in added):
            for column in added:
                con.execute(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN {column.name} {column.type}")
            stored = declared
        if stored != declared:
            raise SchemaMismatch(
                f"table {table} was created by an older gda (columns {[c for c, _ in stored]}, now "
                f"{[c for c, _ in declared]}); drop it (DROP TABLE {table}) and re-materialize its asset"
            )
