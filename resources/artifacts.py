"""The artifact root: folders of weights, arrays and indices, replaced atomically on re-materialization."""

import shutil
from pathlib import Path

import dagster as dg


class Artifacts(dg.ConfigurableResource):
    root: str

    def path(self, name: str) -> Path:
        return Path(self.root) / name

    def fresh(self, name: str) -> Path:
        """An empty staging folder for a new version of ``name``; ``publish`` swaps it in."""
        staging = Path(self.root) / f".{name}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def publish(self, name: str, staging: Path) -> Path:
        """Replace ``name`` with ``staging``: readers see the old folder or the new one, never a mix."""
        target, retired = self.path(name), Path(self.root) / f".{name}.retired"
        shutil.rmtree(retired, ignore_errors=True)
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
        return target
