"""Short-lived DuckDB connections that wait briefly while another process holds the database file.

DuckDB lets one process open a file read-write, or any number of processes open it read-only, never both:
while a Dagster materialization writes gda.duckdb, every other process's connection fails at once with a
lock error. `connect` retries for a little while and then raises `DatabaseLocked`, so that the caller
decides what a busy database means (the audit log spools its row; the query service gives up with a message).
"""

from __future__ import annotations

import time
from pathlib import Path

import duckdb


class DatabaseLocked(TimeoutError):
    """Another process held the DuckDB file for longer than the caller was willing to wait."""


def is_lock_conflict(error: duckdb.Error) -> bool:
    return isinstance(error, duckdb.IOException) and "lock" in str(error).lower()


def connect(path: Path, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    """A connection to `path`, retried with growing pauses for up to `wait_s` seconds while it is locked."""
    deadline = time.monotonic() + wait_s
    pause = 0.02
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as error:
            if not is_lock_conflict(error):
                raise
            if time.monotonic() + pause > deadline:
                raise DatabaseLocked(
                    f"{path} stayed locked by another process for {wait_s:g} s (a Dagster run writing it?): {error}"
                ) from error
            time.sleep(pause)
            pause = min(2 * pause, 0.25)
