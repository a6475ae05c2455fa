"""The IO manager of the DuckDB tables: the library's Polars one, with each write made one transaction.

The library deletes a partition's rows and inserts the new ones on an autocommit connection, so a process
killed in between leaves the partition empty. Here the whole connection is one transaction: a kill (or an
error) at any point leaves the previous rows exactly as they were, and readers never see a half-written
partition.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
from dagster import InitResourceContext, InputContext, OutputContext
from dagster._core.storage.db_io_manager import DbIOManager, TableSlice
from dagster_duckdb.io_manager import DuckDbClient
from dagster_duckdb_polars import DuckDBPolarsIOManager


class TransactionalDuckDbClient(DuckDbClient):
    @staticmethod
    @contextmanager
    def connect(context: OutputContext | InputContext, table_slice: TableSlice) -> Iterator[duckdb.DuckDBPyConnection]:
        """The library's connection (with its retries while another process holds the file lock), inside
        BEGIN ... COMMIT, rolled back on any exception."""
        with DuckDbClient.connect(context, table_slice) as connection:
            connection.begin()
            try:
                yield connection
            except BaseException:
                connection.rollback()
                raise
            connection.commit()


class TransactionalDuckDBPolarsIOManager(DuckDBPolarsIOManager):
    def create_io_manager(self, context: InitResourceContext) -> DbIOManager:
        # DuckDBIOManager.create_io_manager with the transactional client in place of DuckDbClient.
        return DbIOManager(
            db_client=TransactionalDuckDbClient(),
            database=self.database,
            schema=self.schema_,
            type_handlers=self.type_handlers(),
            default_load_type=self.default_load_type(),
            io_manager_name="DuckDBIOManager",
        )
