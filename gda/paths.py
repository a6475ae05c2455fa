"""Paths from configuration: resolved to absolute paths once, and model files read only from inside their
model folder.

A configured path is resolved where it is read into configuration, so a run reads the same folder
whatever its working directory. A model folder is trusted as a whole, not file by file: a symlink in it, or
a name with ``..`` that it hands to a loader (a shard of ``*.index.json``, a model card's ``weights``), must
not make a load read a file elsewhere on disk. The one exception is the Hugging Face cache layout, where
``models--ORG--NAME/snapshots/REV/`` links its files into ``models--ORG--NAME/blobs/``: there the folder is
the cached repository.
"""

from __future__ import annotations

import json
from pathlib import Path


class ModelPathError(ValueError):
    """A configured model folder does not exist, or a file it names lies outside it."""


def resolved(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, absolute, with symlinks and ``..`` resolved."""
    return Path(path).expanduser().resolve()


def _repository(folder: Path) -> Path:
    return folder.parent.parent if folder.parent.name == "snapshots" else folder


def inside(folder: Path, name: str | Path, what: str) -> Path:
    """``folder / name`` resolved, refused if it lies outside ``folder`` (through ``..`` or a symlink)."""
    root = _repository(resolved(folder))
    target = resolved(Path(folder) / name)
    if not target.is_relative_to(root):
        raise ModelPathError(
            f"{what} {str(name)!r} resolves to {target}, outside its model folder {root}; refusing to read it"
        )
    return target


def model_folder(path: str | Path, what: str) -> Path:
    """The model folder ``path``, resolved, after checking that every file in it, and every weights file its
    ``*.index.json`` files name, lies inside it."""
    folder = resolved(path)
    if not folder.is_dir():
        raise ModelPathError(f"{what} {path} is not a folder: point the setting at an existing model folder")
    for file in folder.rglob("*"):
        inside(folder, file.relative_to(folder), f"{what} file")
    for index in folder.rglob("*.index.json"):
        for name in set(json.loads(index.read_text()).get("weight_map", {}).values()):
            inside(folder, index.parent.relative_to(folder) / name, f"{what} weights listed in {index.name}")
    return folder
