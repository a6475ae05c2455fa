"""The warehouse waits for another process's DuckDB writer instead of failing on the lock, and says so when
the writer holds on past its patience."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gda.connections import DatabaseLocked
from resources import Warehouse

HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("CREATE TABLE IF NOT EXISTS held (x INTEGER)")
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_reads_and_writes_wait_for_a_writer_in_another_process(tmp_path: Path) -> None:
    warehouse = Warehouse(database=str(tmp_path / "gda.duckdb"))
    warehouse.ensure_tables()
    holder = _hold(tmp_path / "gda.duckdb", 1.5)
    started = time.monotonic()
    assert warehouse.query("SELECT count(*) AS n FROM held")["n"].item() == 0
    assert time.monotonic() - started > 0.5  # it waited for the writer to let go
    holder.wait(timeout=30)


def test_a_writer_that_holds_on_too_long_is_one_clear_error(tmp_path: Path) -> None:
    warehouse = Warehouse(database=str(tmp_path / "gda.duckdb"), lock_wait_s=0.5)
    holder = _hold(tmp_path / "gda.duckdb", 5)
    try:
        with pytest.raises(DatabaseLocked, match="stayed locked by another process"):
            warehouse.query("SELECT 1")
    finally:
        holder.kill()
        holder.wait()
