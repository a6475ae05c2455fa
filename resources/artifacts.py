"""The artifact root: folders of weights, arrays and indices, replaced atomically on re-materialization.

A published folder ``name`` is a symlink to a version folder ``.name.<token>`` beside it. Publishing a new
version points a fresh symlink at it and renames that over ``name``: one rename, atomic, so a reader (or a
process killed at any step) sees the whole old folder or the whole new one. Renaming folders instead (old
away, new in) takes two renames, and a kill between them leaves no ``name`` at all. Superseded versions, and
staging folders of writers that died, are removed after each publish. One writer per name at a time: the
assets that write these folders share the ``gpu`` pool.

A home written before this layout has ``name`` as a real folder, which a symlink cannot be renamed over: its
first publish moves it to ``.name.previous`` and then renames the symlink in. A kill between those two steps
is undone by the next ``fresh``, which moves ``.name.previous`` back.
"""

import os
import shutil
import uuid
from pathlib import Path

import dagster as dg

from gda import layout


class Artifacts(dg.ConfigurableResource):
    root: str

    def path(self, name: str) -> Path:
        return Path(self.root) / name

    def file(self, asset: str, partition: str | None = None) -> Path:
        """One partition's array file (``gda.layout.partition_file``)."""
        return layout.partition_file(Path(self.root), asset, partition)

    def fresh(self, name: str) -> Path:
        """An empty folder for a new version of ``name``; ``publish`` swaps it in."""
        previous, target = self._previous(name), self.path(name)
        if previous.is_dir() and not os.path.lexists(target):
            previous.rename(target)
        staging = Path(self.root) / f".{name}.{uuid.uuid4().hex[:12]}"
        staging.mkdir(parents=True)
        return staging

    def publish(self, name: str, staging: Path) -> Path:
        """Make ``name`` the folder ``staging`` (from ``fresh``): readers see the old folder or the new one,
        never a mix, and never none."""
        target, link = self.path(name), Path(self.root) / f".{name}.link"
        link.unlink(missing_ok=True)
        # Relative, so that a home moved or copied with its symlinks still resolves.
        link.symlink_to(staging.name)
        if target.is_dir() and not target.is_symlink():
            target.rename(self._previous(name))
        os.replace(link, target)
        for stale in Path(self.root).glob(f".{name}.*"):
            if stale.name == staging.name:
                continue
            if stale.is_symlink() or not stale.is_dir():
                stale.unlink()
            else:
                shutil.rmtree(stale)
        return target

    def _previous(self, name: str) -> Path:
        return Path(self.root) / f".{name}.previous"
