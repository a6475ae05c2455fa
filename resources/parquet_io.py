"""Tables as partitioned Parquet: one file per partition, replaced atomically, with DuckDB views over them.

DuckDB lets one process write its file at a time, so GPU workers scoring query batches in parallel would
queue on gda.duckdb's lock to store their rows. With the warehouse's ``table_format: parquet`` the tables of
``PARQUET_TABLES`` are instead one Parquet file per partition, ``<root>/<table>/<column>=<key>.parquet``,
written by ``ParquetIOManager`` without opening DuckDB; gda.duckdb holds views named like the tables over
those files (``Warehouse.ensure_tables``), so the named queries and the checks read them unchanged.

A file is replaced atomically (`gda.parquet_files`): written to a hidden temp name in the same folder, which
the views' ``*.parquet`` glob does not match, then renamed over the partition's file.
"""

from pathlib import Path
from urllib.parse import quote

import dagster as dg
import polars as pl

from gda import tables
from gda.parquet_files import write_parquet_atomically

# The tables that can be kept as Parquet: those whose assets store their output through BATCH_TABLES_IO
# (the teacher's per-query-batch tables, written by the GPU workers).
PARQUET_TABLES = ("dino_candidates", "abu_scores")
BATCH_TABLES_IO = "batch_tables_io"

# A zero-row file with the declared columns in every table folder: the views' glob never matches nothing
# (DuckDB refuses a view over no files), and an empty table still has the declared column types.
SCHEMA_FILE = "_schema.parquet"


def table_folder(root: str | Path, table: str) -> Path:
    return Path(root) / table


def partition_file(root: str | Path, table: str, column: str, key: str) -> Path:
    """Where one partition's rows live: ``<root>/<table>/<column>=<key>.parquet`` (the key percent-encoded
    where it is not a plain file name)."""
    return table_folder(root, table) / f"{column}={quote(key, safe='-_.')}.parquet"


def write_partition(root: str | Path, table: str, column: str, key: str, frame: pl.DataFrame) -> Path:
    """The rows of ``frame`` whose ``column`` is ``key``, as declared, replacing that partition's file."""
    path = partition_file(root, table, column, key)
    write_parquet_atomically(tables.conform(table, frame.filter(pl.col(column) == key)), path)
    return path


def ensure_schema_file(root: str | Path, table: str) -> Path:
    path = table_folder(root, table) / SCHEMA_FILE
    if not path.exists():
        write_parquet_atomically(pl.DataFrame(schema=tables.polars_schema(table)), path)
    return path


def view_sql(root: str | Path, table: str) -> str:
    """The view named like ``table`` over its Parquet files, with the DDL's columns in storage order."""
    columns = ", ".join(column.name for column in tables.columns(table))
    pattern = str(table_folder(Path(root).resolve(), table) / "*.parquet").replace("'", "''")
    return (
        f"CREATE OR REPLACE VIEW {tables.SCHEMA}.{table} AS SELECT {columns} "
        f"FROM read_parquet('{pattern}', union_by_name = true, hive_partitioning = false)"
    )


def read_table(root: str | Path, table: str, column: str | None = None, keys: list[str] | None = None) -> pl.DataFrame:
    """The rows of the partitions ``keys`` of ``column`` (every partition without ``keys``), as declared."""
    if keys is None:
        paths = sorted(p for p in table_folder(root, table).glob("*.parquet") if p.name != SCHEMA_FILE)
    else:
        assert column is not None, "reading partitions needs their column"
        paths = [p for p in (partition_file(root, table, column, key) for key in keys) if p.exists()]
    frames = [pl.read_parquet(path) for path in paths]
    if not frames:
        return pl.DataFrame(schema=tables.polars_schema(table))
    return tables.conform(table, pl.concat(frames, how="diagonal_relaxed"))


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores a partitioned table asset as one Parquet file per partition under ``root`` (replaced atomically
    on re-materialization) and loads partitions back from those files. The DuckDB views over the files are
    the warehouse's (``Warehouse.ensure_tables``)."""

    root: str
    tables: list[str] = list(PARQUET_TABLES)

    def _table(self, key: dg.AssetKey) -> str:
        table = key.path[-1]
        if table not in self.tables:
            raise ValueError(
                f"{table} is not kept as Parquet (only {', '.join(self.tables)}); store it with warehouse_io"
            )
        return table

    def handle_output(self, context: dg.OutputContext, obj: pl.DataFrame) -> None:
        table = self._table(context.asset_key)
        if not context.has_asset_partitions:
            raise ValueError(
                f"{table}: Parquet tables are stored one file per partition, and the asset has no partitions"
            )
        column = context.definition_metadata.get("partition_expr") or tables.partition_column(table)
        frame = tables.conform(table, obj)
        keys = list(context.asset_partition_keys)
        stray = frame.filter(~pl.col(column).is_in(keys)).height
        if stray:
            raise ValueError(
                f"{table}: {stray} rows have a {column} outside the partitions written ({', '.join(keys)})"
            )
        paths = [write_partition(self.root, table, column, key, frame) for key in keys]
        ensure_schema_file(self.root, table)
        context.add_output_metadata(
            {
                "path": dg.MetadataValue.path(str(paths[0] if len(paths) == 1 else table_folder(self.root, table))),
                "files": len(paths),
            }
        )

    def load_input(self, context: dg.InputContext) -> pl.DataFrame:
        table = self._table(context.asset_key)
        if not context.has_asset_partitions:
            return read_table(self.root, table)
        upstream = context.upstream_output.definition_metadata if context.upstream_output else {}
        column = (upstream or {}).get("partition_expr") or tables.partition_column(table)
        return read_table(self.root, table, column, list(context.asset_partition_keys))
