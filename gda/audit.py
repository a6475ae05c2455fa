"""The query service's audit trail: one `attribution_log` row per answer given through `gda query` or `gda serve`.

Rows are appended with a short-lived read-write connection. DuckDB lets one process write a file at a time
and Dagster materializations write gda.duckdb too, so a locked database is waited for briefly, then the row
goes to a JSONL spool file beside it; the next append that gets the database inserts the spooled rows first.

No row is lost and none is stored twice: every row carries a uuid4 `log_id` and is inserted only if that id
is not stored yet, so spooled rows re-sent after a crash between the insert and the spool's truncation are
skipped. The spool is read, inserted and truncated under an exclusive flock that spooling also takes, so a
row another process spools meanwhile waits for the next flush instead of being truncated away.
"""

from __future__ import annotations

import fcntl
import json
import threading
import uuid
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

import duckdb
import polars as pl

from gda import tables
from gda.connections import DatabaseLocked, connect
from gda.home import Home

if TYPE_CHECKING:
    from gda.service import Attribution

INTERFACES = ("cli", "http")
SPOOL_FILE = "attribution_log.spool.jsonl"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.f"  # datetime.isoformat(timespec="microseconds"), as rows are spooled

# Rows are inserted only if their log_id is new; a row is stored with the logged_at it carries, so looking
# among rows logged in the incoming rows' time span finds any earlier copy while scanning only that span.
_INSERT = """
INSERT INTO attribution_log
SELECT * FROM incoming
WHERE log_id NOT IN (SELECT log_id FROM attribution_log WHERE logged_at BETWEEN ? AND ?)
"""


class AuditLog:
    """Appends answers of one interface ('cli' or 'http') to `database`, spooling to `spool` while it is locked."""

    def __init__(self, database: Path, spool: Path, interface: str, lock_wait_s: float = 1.0) -> None:
        if interface not in INTERFACES:
            raise ValueError(f"interface must be one of {INTERFACES}, got {interface!r}")
        self.database = database
        self.spool = spool
        self.interface = interface
        self.lock_wait_s = lock_wait_s
        self._lock = threading.Lock()  # one append at a time per process: threads of a server share this log
        self._tables_checked = False

    @classmethod
    def for_home(cls, home: Home, interface: str) -> AuditLog:
        return cls(home.duckdb_path, home.root / SPOOL_FILE, interface)

    def row(self, answer: Attribution) -> dict[str, object]:
        """The attribution_log row of `answer`, JSON-ready (the timestamp as ISO text, UTC)."""
        return {
            "log_id": str(uuid.uuid4()),
            "logged_at": datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="microseconds"),
            "interface": self.interface,
            "image_sha256": answer.image_sha256,
            "prompt": answer.prompt,
            "top_k": answer.top_k,
            "model_version": answer.versions.model,
            "embedder_version": answer.versions.embedder,
            "index_version": answer.versions.index,
            "train_ids": [match.train_id for match in answer.results],
            "scores": [match.score for match in answer.results],
            "latency_ms": answer.timings_ms["total"],
        }

    def append(self, answer: Attribution) -> Literal["logged", "spooled"]:
        """Store the row of `answer` (and any spooled rows before it), or spool it if the database stays locked."""
        row = self.row(answer)
        with self._lock:
            try:
                con = connect(self.database, read_only=False, wait_s=self.lock_wait_s)
            except DatabaseLocked:
                self._spool(row)
                return "spooled"
            with con:
                if not self._tables_checked:
                    # Once per process: creating and checking every declared table costs more than the insert.
                    tables.create_tables(con)
                    self._tables_checked = True
                self._insert_with_spooled(con, row)
        return "logged"

    def _spool(self, row: dict[str, object]) -> None:
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with self.spool.open("a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(json.dumps(row) + "\n")

    def _insert_with_spooled(self, con: duckdb.DuckDBPyConnection, row: dict[str, object]) -> None:
        if not self.spool.exists():
            _insert(con, [row])
            return
        with self.spool.open("r+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            _insert(con, [*_read_spool(handle, self.spool), row])
            # Truncated, not removed: a process waiting for the flock holds this file and will write to it.
            handle.truncate(0)


def _read_spool(handle: IO[str], path: Path) -> list[dict[str, object]]:
    rows = []
    for number, line in enumerate(handle, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # Only a writer killed mid-line leaves one; its answer was never returned.
            warnings.warn(f"{path}:{number}: skipping a spooled audit row that is not JSON", stacklevel=2)
    return rows


def _insert(con: duckdb.DuckDBPyConnection, rows: Sequence[dict[str, object]]) -> None:
    schema = {**tables.polars_schema("attribution_log"), "logged_at": pl.String}
    frame = pl.DataFrame(rows, schema=schema).with_columns(
        pl.col("logged_at").str.to_datetime(_TIME_FORMAT, time_unit="us")
    )
    con.register("incoming", frame)
    try:
        con.execute(_INSERT, [frame["logged_at"].min(), frame["logged_at"].max()])
    finally:
        con.unregister("incoming")
