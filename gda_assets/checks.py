"""Blocking asset checks, generated from the one schema source (sql/schema.sql), plus table invariants.

Checks run inside the writing asset's step, right after its output is stored, and read the stored rows
back with a read-only connection: they verify what is in DuckDB, not the frame that was meant to be.
"""


import dagster as dg

from gda import tables
from gda.corpus.ingest import REASONS
from resources import Warehouse

SCHEMA_CHECK = "conforms_to_schema"

# An invariant: (name, description, SQL returning one integer: the number of violating rows for shard ?).
Invariant = tuple[str, str, str]

INVARIANTS: dict[str, list[Invariant]] = {
    "training_images": [
        (
            "unique_ids",
            "No training image id occurs twice anywhere in the table.",
            "SELECT count(*) - count(DISTINCT id) FROM training_images WHERE ? IS NOT NULL",
        ),
        (
            "ids_match_shard",
            "Every id carries its shard number in the high 32 bits.",
            "SELECT count(*) FROM training_images WHERE shard = ? AND (id >> 32) <> CAST(shard AS BIGINT)",
        ),
    ],
    "rejected_images": [
        (
            "known_reasons",
            "Every rejection has a documented reason code.",
            "SELECT count(*) FROM rejected_images WHERE shard = ? AND reason NOT IN ("
            + ", ".join(f"'{code}'" for code in REASONS)
            + ")",
        ),
    ],
}


def column_schema(table: str) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=c.name,
                type=c.type,
                description=c.description or None,
                constraints=dg.TableColumnConstraints(nullable=c.nullable),
            )
            for c in tables.columns(table)
        ]
    )


def table_check_specs(table: str) -> list[dg.AssetCheckSpec]:
    specs = [
        dg.AssetCheckSpec(
            SCHEMA_CHECK,
            asset=table,
            blocking=True,
            description="Stored columns and types equal sql/schema.sql; NOT NULL columns hold no nulls; "
            "the partition holds exactly the rows written.",
        )
    ]
    specs += [dg.AssetCheckSpec(name, asset=table, blocking=True, description=text) for name, text, _ in INVARIANTS.get(table, [])]
    return specs


def _schema_result(warehouse: Warehouse, table: str, shard: str, expected_rows: int) -> dg.AssetCheckResult:
    declared = [(c.name, c.type) for c in tables.columns(table)]
    stored = warehouse.query(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = ? AND table_name = ? "
        "ORDER BY column_index",
        [tables.SCHEMA, table],
    ).rows()
    problems: list[str] = []
    if [tuple(r) for r in stored] != declared:
        problems.append(f"stored columns {stored} differ from the DDL {declared}")
    else:
        for column in tables.columns(table):
            if not column.nullable:
                nulls = warehouse.query(
                    f"SELECT count(*) FROM {tables.SCHEMA}.{table} WHERE shard = ? AND {column.name} IS NULL", [shard]
                ).item()
                if nulls:
                    problems.append(f"{nulls} nulls in NOT NULL column {column.name}")
        rows = warehouse.query(f"SELECT count(*) FROM {tables.SCHEMA}.{table} WHERE shard = ?", [shard]).item()
        if rows != expected_rows:
            problems.append(f"partition holds {rows} rows, {expected_rows} were written")
    return dg.AssetCheckResult(
        check_name=SCHEMA_CHECK,
        asset_key=table,
        passed=not problems,
        description="; ".join(problems) or None,
        metadata={"rows": expected_rows},
    )


def table_check_results(warehouse: Warehouse, table: str, shard: str, expected_rows: int) -> list[dg.AssetCheckResult]:
    """Evaluate every check of ``table_check_specs(table)`` against the stored partition ``shard``."""
    results = [_schema_result(warehouse, table, shard, expected_rows)]
    for name, _, sql in INVARIANTS.get(table, []):
        violations = warehouse.query(sql, [shard]).item()
        results.append(
            dg.AssetCheckResult(
                check_name=name, asset_key=table, passed=violations == 0, metadata={"violations": violations}
            )
        )
    return results
