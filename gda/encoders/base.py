"""Helpers shared by the encoder backends: errors, version hashing and batched inference.

Nothing here imports torch at module import; backends pass their own forward function in.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")

_CHUNK = 1 << 20


class EncoderError(ValueError):
    """An encoder could not be built from its settings (unknown backend, missing model, unsupported model type)."""


@lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so a rewritten file is hashed again.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, hashed once per (path, size, mtime) in this process."""
    st = os.stat(path)
    return _digest(str(path), st.st_size, st.st_mtime_ns)


def version_hash(backend: str, files: Iterable[Path], settings: str = "") -> str:
    """Short, stable id over the backend name, the bytes of `files` and extra `settings`.

    Files are keyed by name (not full path) so the same weights installed elsewhere keep their version.
    """
    h = hashlib.sha256(backend.encode())
    for path in sorted(files, key=lambda p: p.name):
        h.update(path.name.encode())
        h.update(file_digest(path).encode())
    h.update(settings.encode())
    return h.hexdigest()[:12]


def encode_batched(
    items: Sequence[T],
    forward: Callable[[Sequence[T]], np.ndarray],
    dim: int,
    batch_size: int,
    progress: bool,
    desc: str,
) -> np.ndarray:
    """Run `forward` over `items` in slices of `batch_size`, returning a float32 (n, dim) array."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = np.empty((len(items), dim), dtype=np.float32)
    starts = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for start in starts:
        out[start : start + batch_size] = forward(items[start : start + batch_size])
    return out
