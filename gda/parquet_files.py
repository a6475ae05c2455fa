"""Parquet files replaced atomically: written to a hidden temp name in the same folder
(``.NAME.<pid>-<token>.tmp``), flushed to disk, then renamed over the file with ``os.replace``. Readers see
the old file or the new one, never a half-written one, and a process killed mid-write leaves the old file as
it was (plus its temp file, which nothing reads).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import polars as pl


def _replace(source: Path, target: Path) -> None:
    """The publishing rename (a function of its own so tests can fail or kill at exactly this moment)."""
    os.replace(source, target)


def write_parquet_atomically(frame: pl.DataFrame, path: Path) -> None:
    """Write ``frame`` to ``path`` via a temp file in the same folder and one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp, "wb") as handle:
            frame.write_parquet(handle)
            handle.flush()
            os.fsync(handle.fileno())
        _replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
