"""The query service's audit trail: one `attribution_log` row per answer given through `gda query` or `gda serve`.

An answer is durable before it is returned: its row is appended to a write-ahead file beside the database
(`attribution_log.spool.jsonl`, one JSON object per line) and fsynced, one fsync for every row that was
written while the previous fsync ran (group commit), so a micro-batch of answers costs one fsync, not one
each. Rows move from that file to DuckDB in batches (`AuditLog.move`): a server's mover thread does it about
once a second, `gda query` right after its answer. DuckDB lets one process write a file at a time and Dagster
materializations write gda.duckdb too, so a locked database is waited for briefly and the rows stay in the
file for the next move; a process killed at any moment leaves every returned answer in the file or the table.

No row is lost and none is stored twice: every row carries the answer's uuid4 `log_id` and is inserted only if
that id is not stored yet, so rows re-read after a crash between the insert and the file's truncation are
skipped. The file is read, inserted and truncated under an exclusive flock that appending also takes, so a
row another process appends meanwhile waits for the next move instead of being truncated away.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

import duckdb
import polars as pl

from gda import tables
from gda.connections import DatabaseLocked, connect
from gda.home import Home

if TYPE_CHECKING:
    from gda.service import Attribution

INTERFACES = ("cli", "http")
SPOOL_FILE = "attribution_log.spool.jsonl"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%.f"  # datetime.isoformat(timespec="microseconds"), as rows are written

# Rows are inserted only if their log_id is new; a row is stored with the logged_at it carries, so looking
# among rows logged in the incoming rows' time span finds any earlier copy while scanning only that span.
_INSERT = """
INSERT INTO attribution_log
SELECT * FROM incoming
WHERE log_id NOT IN (SELECT log_id FROM attribution_log WHERE logged_at BETWEEN ? AND ?)
"""


class AuditLog:
    """Logs answers of one interface ('cli' or 'http') to `database` through the write-ahead file `spool`."""

    def __init__(self, database: Path, spool: Path, interface: str, lock_wait_s: float = 1.0) -> None:
        if interface not in INTERFACES:
            raise ValueError(f"interface must be one of {INTERFACES}, got {interface!r}")
        self.database = database
        self.spool = spool
        self.interface = interface
        self.lock_wait_s = lock_wait_s
        self._write = threading.Lock()  # one writer of this process's descriptor at a time
        self._sync = threading.Condition()
        self._written = 0  # groups written to the file by this process, and of those, fsynced
        self._synced = 0
        self._syncing = False
        self._move = threading.Lock()
        self._tables_checked = False
        self._handle: int | None = None
        self._mover: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def for_home(cls, home: Home, interface: str) -> AuditLog:
        return cls(home.duckdb_path, home.root / SPOOL_FILE, interface)

    def row(self, answer: Attribution) -> dict[str, object]:
        """The attribution_log row of `answer`, JSON-ready (the timestamp as ISO text, UTC)."""
        return {
            "log_id": answer.log_id,
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

    def record(self, answers: Sequence[Attribution]) -> None:
        """Append the rows of `answers` to the write-ahead file and return once they are on disk."""
        if not answers:
            return
        data = "".join(json.dumps(self.row(answer)) + "\n" for answer in answers).encode()
        with self._write:
            handle = self._descriptor()
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                end = os.lseek(handle, 0, os.SEEK_END)
                # Only a power loss leaves a line without its newline; end it so this row stays a line of its own.
                if end and os.pread(handle, 1, end - 1) != b"\n":
                    data = b"\n" + data
                os.write(handle, data)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
            self._written += 1
            group = self._written
        self._fsync_through(group, handle)

    def _descriptor(self) -> int:
        if self._handle is None:
            self.spool.parent.mkdir(parents=True, exist_ok=True)
            self._handle = os.open(self.spool, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        return self._handle

    def _fsync_through(self, group: int, handle: int) -> None:
        """Wait until group `group` is fsynced; the first waiter fsyncs for every group written so far."""
        with self._sync:
            while self._synced < group:
                if self._syncing:
                    self._sync.wait()
                    continue
                self._syncing = True
                target = self._written
                self._sync.release()
                try:
                    os.fsync(handle)
                finally:
                    self._sync.acquire()
                    self._syncing = False
                    self._synced = max(self._synced, target)
                    self._sync.notify_all()

    def move(self) -> int:
        """Insert the write-ahead file's rows into attribution_log and empty it; the number of rows it held.

        0 when the file is empty, and when the database stays locked past `lock_wait_s` (the rows wait for the
        next move)."""
        with self._move:
            if not self.spool.exists() or not self.spool.stat().st_size:
                return 0
            try:
                con = connect(self.database, read_only=False, wait_s=self.lock_wait_s)
            except DatabaseLocked:
                return 0
            with con, self.spool.open("r+", encoding="utf-8") as handle:
                if not self._tables_checked:
                    # Once per process: creating and checking every declared table costs more than the insert.
                    tables.create_tables(con)
                    self._tables_checked = True
                fcntl.flock(handle, fcntl.LOCK_EX)
                rows = _read_spool(handle, self.spool)
                if rows:
                    _insert(con, rows)
                # Truncated, not removed: other processes hold this file open and keep appending to it.
                handle.truncate(0)
                return len(rows)

    def start(self, every_s: float = 1.0) -> None:
        """Move rows in a background thread every `every_s` seconds until `close`."""
        if self._mover is not None:
            return

        def run() -> None:
            while not self._stop.wait(every_s):
                try:
                    self.move()
                except Exception as error:  # a failed move keeps its rows in the file; the next one retries
                    warnings.warn(f"moving audit rows to {self.database} failed: {error}", stacklevel=1)

        self._mover = threading.Thread(target=run, name="gda-audit-mover", daemon=True)
        self._mover.start()

    def close(self) -> None:
        """Stop the mover, move what is left (if the database is free) and close the file."""
        self._stop.set()
        if self._mover is not None:
            self._mover.join()
            self._mover = None
        self.move()
        with self._write:
            if self._handle is not None:
                os.close(self._handle)
                self._handle = None

    def pending(self) -> int:
        """Rows in the write-ahead file, not yet in attribution_log."""
        if not self.spool.exists():
            return 0
        return sum(1 for line in self.spool.read_text(encoding="utf-8").splitlines() if line.strip())


def _read_spool(handle: IO[str], path: Path) -> list[dict[str, object]]:
    rows = []
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # Only a power loss mid-write leaves one; its answer was never returned (rows are synced first).
            warnings.warn(f"{path}:{number}: skipping an audit row that is not JSON", stacklevel=2)
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
