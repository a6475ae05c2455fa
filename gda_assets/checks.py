"""Asset checks of stored tables, generated from the one schema source (sql/schema.sql), plus table
invariants (blocking) and warnings (non-blocking: what they count is allowed but worth a look).

Checks run inside the writing asset's step, right after its output is stored, and read the stored rows
back with a read-only connection: they verify what is in DuckDB, not the frame that was meant to be.
"""

from dataclasses import dataclass

import dagster as dg

from gda import tables
from gda.corpus.ingest import REASONS
from gda.student_guard import StudentGuard
from resources import Warehouse

SCHEMA_CHECK = "conforms_to_schema"

# An invariant: (name, description, SQL counting the violating rows). ``{where}`` becomes the partition's
# filter (``WHERE shard = ?``) or nothing for an unpartitioned table; ``{table}`` the qualified name.
Invariant = tuple[str, str, str]

INVARIANTS: dict[str, list[Invariant]] = {
    "training_images": [
        (
            "unique_ids",
            "No training image id occurs twice anywhere in the table.",
            "SELECT count(*) - count(DISTINCT id) FROM {table}",
        ),
        (
            "ids_match_shard",
            "Every id carries its shard number in the high 32 bits.",
            "SELECT count(*) FROM {table} {where} AND (id >> 32) <> CAST(shard AS BIGINT)",
        ),
    ],
    "rejected_images": [
        (
            "known_reasons",
            "Every rejection has a documented reason code.",
            "SELECT count(*) FROM {table} {where} AND reason NOT IN ("
            + ", ".join(f"'{code}'" for code in REASONS)
            + ")",
        ),
    ],
    "query_prompts": [
        ("unique_query_ids", "No query id occurs twice.", "SELECT count(*) - count(DISTINCT query_id) FROM {table}"),
        (
            "known_splits",
            "Every prompt belongs to the train, val or test split.",
            "SELECT count(*) FROM {table} WHERE split NOT IN ('train', 'val', 'test')",
        ),
    ],
    "dino_candidates": [
        (
            "every_query_has_candidates",
            "Every query of the batch has its nearest training images.",
            "SELECT (SELECT count(*) FROM {schema}.query_prompts {where}) - count(DISTINCT query_id) FROM {table} "
            "{where} AND kind = 'candidate'",
        ),
        (
            "ranks_are_a_permutation",
            "Per query, candidate ranks are exactly 0..K-1.",
            "SELECT count(*) FROM (SELECT count(*) AS n, min(rank) AS lo, max(rank) AS hi, count(DISTINCT rank) AS d "
            "FROM {table} {where} AND kind = 'candidate' GROUP BY query_id) WHERE lo <> 0 OR hi <> n - 1 OR d <> n",
        ),
        (
            "negatives_are_not_candidates",
            "No negative of a query is also one of its candidates.",
            "SELECT count(*) FROM (SELECT * FROM {table} {where}) a JOIN {table} b USING (query_id, train_id) "
            "WHERE a.kind = 'negative' AND b.kind = 'candidate'",
        ),
    ],
    "abu_scores": [
        (
            "finite_scores",
            "No score is NaN or infinite.",
            "SELECT count(*) FROM {table} {where} AND (isnan(score) OR isinf(score))",
        ),
        (
            "every_candidate_scored",
            "Every DINO candidate of every query of the batch has a score.",
            "SELECT count(*) FROM (SELECT * FROM {schema}.dino_candidates {where} AND kind = 'candidate') c "
            "ANTI JOIN {table} s USING (query_id, train_id)",
        ),
        (
            "ranks_are_a_permutation",
            "Per query, ranks are exactly 0..n_candidates-1.",
            "SELECT count(*) FROM (SELECT count(*) AS n, min(rank) AS lo, max(rank) AS hi, count(DISTINCT rank) AS d, "
            "max(n_candidates) AS k FROM {table} {where} GROUP BY query_id) WHERE lo <> 0 OR hi <> n - 1 OR d "
            "<> n OR k <> n",
        ),
    ],
    "eval_rank": [
        (
            "map_is_a_fraction",
            "Every mAP lies in [0, 1] with a finite, non-negative standard error.",
            "SELECT count(*) FROM {table} WHERE NOT (map BETWEEN 0 AND 1) OR NOT isfinite(se) OR se < 0",
        ),
        (
            "every_method_at_every_level",
            "Each method has one row per L and all rows cover the same test queries.",
            "SELECT (SELECT count(*) FROM {table}) - (SELECT count(DISTINCT method) * count(DISTINCT L) FROM {table}) "
            "+ (SELECT count(DISTINCT n_queries) - 1 FROM {table})",
        ),
    ],
    "eval_counterfactual": [
        (
            "finite_measurements",
            "Every loss and pixel MSE is finite.",
            "SELECT count(*) FROM {table} {where} AND NOT (isfinite(loss_before) AND isfinite(loss_after) "
            "AND isfinite(delta_loss) AND isfinite(pixel_mse))",
        ),
        (
            "retrained_without_k",
            "Each retrain removed k distinct training images and trained on all the others.",
            "SELECT count(*) FROM {table} {where} AND (len(removed_ids) <> k OR len(list_distinct(removed_ids)) <> k "
            "OR n_train + k <> (SELECT count(*) FROM {schema}.training_images))",
        ),
        (
            "removed_are_training_images",
            "Every removed id is an ingested training image.",
            "SELECT count(*) FROM (SELECT unnest(removed_ids) AS id FROM {table} {where}) r "
            "ANTI JOIN {schema}.training_images t USING (id)",
        ),
    ],
    "generated_queries": [
        (
            "every_prompt_generated",
            "Every prompt of the batch has exactly one generated image.",
            "SELECT (SELECT count(*) FROM {schema}.query_prompts {where}) - count(DISTINCT query_id) FROM "
            "{table} {where}",
        ),
    ],
}


# Warnings have the shape of invariants; a violation fails the check with severity WARN and blocks nothing.
WARNINGS: dict[str, list[Invariant]] = {
    "training_images": [
        (
            "no_duplicate_images",
            "No image of the shard (by sha256) is also stored under another key or in another shard: a copied "
            "shard or a repeated download counts twice in the index and in every attribution.",
            "SELECT count(*) FROM {table} {where} AND sha256 IN "
            "(SELECT sha256 FROM {table} GROUP BY sha256 HAVING count(*) > 1)",
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


def table_check_specs(table: str, asset: str | None = None) -> list[dg.AssetCheckSpec]:
    """The checks of ``table``, on the asset that writes it (named like the table unless ``asset`` says)."""
    asset = asset or table
    specs = [
        dg.AssetCheckSpec(
            SCHEMA_CHECK,
            asset=asset,
            blocking=True,
            description="Stored columns and types equal sql/schema.sql; NOT NULL columns hold no nulls; "
            "the partition holds exactly the rows written.",
        )
    ]
    specs += [
        dg.AssetCheckSpec(name, asset=asset, blocking=True, description=text)
        for name, text, _ in INVARIANTS.get(table, [])
    ]
    specs += [dg.AssetCheckSpec(name, asset=asset, description=text) for name, text, _ in WARNINGS.get(table, [])]
    return specs


@dataclass(frozen=True)
class Partition:
    """Which rows a check looks at: those of one partition (column = key), or the whole table."""

    column: str | None = None
    key: str | None = None

    @property
    def where(self) -> str:
        # "WHERE TRUE" keeps "{where} AND ..." valid for unpartitioned tables.
        return f"WHERE {self.column} = ?" if self.column else "WHERE TRUE"

    def params(self, sql: str) -> list[str]:
        return [self.key] * sql.count("?") if self.column else []


def _schema_result(
    warehouse: Warehouse, table: str, asset: str, part: Partition, expected_rows: int
) -> dg.AssetCheckResult:
    declared = [(c.name, c.type) for c in tables.columns(table)]
    stored = warehouse.query(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = ? AND table_name = ? "
        "ORDER BY column_index",
        [tables.SCHEMA, table],
    ).rows()
    problems: list[str] = []
    qualified = f"{tables.SCHEMA}.{table}"
    if [tuple(r) for r in stored] != declared:
        problems.append(f"stored columns {stored} differ from the DDL {declared}")
    else:
        for column in tables.columns(table):
            if not column.nullable:
                sql = f"SELECT count(*) FROM {qualified} {part.where} AND {column.name} IS NULL"
                nulls = warehouse.query(sql, part.params(sql)).item()
                if nulls:
                    problems.append(f"{nulls} nulls in NOT NULL column {column.name}")
        sql = f"SELECT count(*) FROM {qualified} {part.where}"
        rows = warehouse.query(sql, part.params(sql)).item()
        if rows != expected_rows:
            problems.append(
                f"{'partition' if part.column else 'table'} holds {rows} rows, {expected_rows} were written"
            )
    return dg.AssetCheckResult(
        check_name=SCHEMA_CHECK,
        asset_key=asset,
        passed=not problems,
        description="; ".join(problems) or None,
        metadata={"rows": expected_rows},
    )


def table_check_results(
    warehouse: Warehouse, table: str, expected_rows: int, part: Partition = Partition(), asset: str | None = None
) -> list[dg.AssetCheckResult]:
    """Evaluate every check of ``table_check_specs(table, asset)`` against the stored rows of ``part``."""
    asset = asset or table
    results = [_schema_result(warehouse, table, asset, part, expected_rows)]
    checks = [(check, dg.AssetCheckSeverity.ERROR) for check in INVARIANTS.get(table, [])]
    checks += [(check, dg.AssetCheckSeverity.WARN) for check in WARNINGS.get(table, [])]
    for (name, _, template), severity in checks:
        sql = template.format(table=f"{tables.SCHEMA}.{table}", schema=tables.SCHEMA, where=part.where)
        violations = warehouse.query(sql, part.params(sql)).item()
        results.append(
            dg.AssetCheckResult(
                check_name=name,
                asset_key=asset,
                passed=violations == 0,
                severity=severity,
                metadata={"violations": violations},
            )
        )
    return results


STUDENT_GUARD = "distilled_above_its_inputs"


def student_guard_spec(asset: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        STUDENT_GUARD,
        asset=asset,
        blocking=False,
        description="Warns when the distilled embedder's mAP falls below raw concatenation or text features "
        "alone at any L: its fast answers are then worse than a plain search on its own inputs.",
    )


def student_guard_result(guard: StudentGuard, asset: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=STUDENT_GUARD,
        asset_key=asset,
        passed=guard.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=guard.message(),
        metadata={"shortfalls": dg.MetadataValue.md(guard.markdown()), "count": guard.shortfalls.height},
    )
