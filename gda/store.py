"""What gda's home-level functions read: the artifact root, the warehouse's tables and the shards.

The Dagster resources (``resources.Warehouse``, ``Artifacts``, ``CorpusSource``) supply them, and so can a
benchmark or a test; gda only sees this interface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from gda import layout


class Tables(Protocol):
    """Read-only queries of the warehouse: a named query of ``sql/queries.sql``, or any SQL."""

    def named(self, name: str, params: list[Any] | None = None) -> pl.DataFrame: ...

    def query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame: ...


@dataclass(frozen=True)
class Store:
    artifacts: Path
    tables: Tables
    shard_path: Callable[[str], Path]  # shard key -> its NNNNN.tar

    def folder(self, asset: str) -> Path:
        """The published folder (or the folder of partition files) of ``asset``."""
        return Path(self.artifacts) / asset

    def file(self, asset: str, partition: str | None = None) -> Path:
        return layout.partition_file(Path(self.artifacts), asset, partition)

    def training_rows(self, ids: list[int]) -> pl.DataFrame:
        """Rows of ``training_items_by_id`` in the order of ``ids``."""
        rows = self.tables.named("training_items_by_id", [ids])
        return pl.DataFrame({"id": ids}).join(rows, on="id", how="left", maintain_order="left")
