"""The home directory: the one place a run writes to.

Layout under the root (``--home``, ``GDA_HOME``, default ``./.gda``):
``gda.duckdb`` (tables), ``artifacts/`` (arrays, weights, indices), ``shards/`` (the embedded corpus) and
``dagster/`` (``DAGSTER_HOME``, with a ``dagster.yaml`` that configures pools and turns telemetry off,
since the machines this runs on often have no network).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = ".gda"

_DAGSTER_YAML = """\
# Written by gda; safe to edit, rewritten only when missing.
telemetry:
  enabled: false
concurrency:
  runs:
    max_concurrent_runs: 4
  pools:
    # One step at a time per pool: `gpu` (one accelerator) and `duckdb` (DuckDB allows a single
    # read-write process per file, so writers queue instead of failing on the lock). A machine with
    # more GPUs raises the gpu pool with: dagster instance concurrency set gpu N
    granularity: op
    default_limit: 1
nux:
  enabled: false
code_servers:
  # On a busy 2-core machine the default 180 s wait for a code server to start once ran out (when loading
  # the definitions still imported torch, ~10 s of CPU; now ~2 s) and new runs stalled; the margin stays.
  local_startup_timeout: 600
"""


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, root: str | os.PathLike[str] | None = None) -> Home:
        """The home from an explicit path, else ``GDA_HOME``, else ``./.gda``; always absolute."""
        chosen = root if root is not None else os.environ.get("GDA_HOME", DEFAULT_HOME)
        return cls(Path(chosen).expanduser().resolve())

    @property
    def duckdb_path(self) -> Path:
        return self.root / "gda.duckdb"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    def ensure(self) -> Home:
        """Create the layout and the instance config; existing files are left as the user edited them."""
        for path in (self.root, self.artifacts, self.shards, self.dagster_home):
            path.mkdir(parents=True, exist_ok=True)
        config = self.dagster_home / "dagster.yaml"
        if not config.exists():
            config.write_text(_DAGSTER_YAML)
        return self
