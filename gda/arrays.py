"""Per-partition arrays on disk: row ids plus a float matrix, in one safetensors file.

safetensors because it cannot execute code on load (unlike pickle/npz with objects) and memory-maps;
files are written to a temp name and renamed, so a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


@dataclass(frozen=True)
class IdArray:
    ids: np.ndarray  # int64, one per row
    values: np.ndarray  # float32, (rows, dim)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ids.ndim != 1 or self.values.ndim != 2 or len(self.ids) != len(self.values):
            raise ValueError(f"ids {self.ids.shape} and values {self.values.shape} do not pair row for row")


def save(path: Path, array: IdArray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(
            {"ids": np.ascontiguousarray(array.ids, dtype=np.int64), "values": np.ascontiguousarray(array.values)},
            str(tmp),
            metadata=array.metadata,
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> IdArray:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    return IdArray(ids=tensors["ids"], values=tensors["values"], metadata=dict(metadata))
