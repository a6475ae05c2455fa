"""A home written by an older gda: a table that lacks only newer nullable columns gets them with its rows
kept; a table whose columns differ otherwise is refused with the fix, and keeps its rows."""

from __future__ import annotations

import duckdb
import pytest

from gda import tables


def _older(con: duckdb.DuckDBPyConnection, table: str, keep: int) -> list[str]:
    """``table`` as an older gda made it: its first ``keep`` declared columns, one row."""
    kept = tables.columns(table)[:keep]
    con.execute(f"CREATE TABLE {tables.SCHEMA}.{table} ({', '.join(f'{c.name} {c.type}' for c in kept)})")
    return [c.name for c in kept]


def test_a_table_lacking_a_newer_nullable_column_gets_it_and_keeps_its_rows() -> None:
    con = duckdb.connect(":memory:")
    declared = tables.columns("student_study")
    assert declared[-1].name == "rerank_m" and declared[-1].nullable
    names = _older(con, "student_study", len(declared) - 1)
    values = {
        "VARCHAR": "'x'",
        "INTEGER": "1",
        "BIGINT": "2",
        "DOUBLE": "0.5",
        "BOOLEAN": "true",
    }
    con.execute(
        f"INSERT INTO student_study ({', '.join(names)}) VALUES ({', '.join(values[c.type] for c in declared[:-1])})"
    )
    tables.create_tables(con)
    rows = con.execute("SELECT arm, map, rerank_m FROM student_study").fetchall()
    assert rows == [("x", 0.5, None)]
    sql = "SELECT column_name FROM duckdb_columns() WHERE table_name = 'student_study' ORDER BY column_index"
    stored = [r[0] for r in con.execute(sql).fetchall()]
    assert stored == [c.name for c in declared]


def test_a_table_lacking_a_required_column_is_refused_and_keeps_its_rows() -> None:
    con = duckdb.connect(":memory:")
    declared = tables.columns("student_study")
    not_null = max(i for i, c in enumerate(declared) if not c.nullable)  # train_seconds
    _older(con, "student_study", not_null)
    con.execute("INSERT INTO student_study (arm) VALUES ('kept')")
    with pytest.raises(tables.SchemaMismatch, match="DROP TABLE student_study"):
        tables.create_tables(con)
    assert con.execute("SELECT arm FROM student_study").fetchall() == [("kept",)]
