"""Where training shards come from: the folder the sensor watches, and the embedded demo corpus spec."""

from pathlib import Path

import dagster as dg
from pydantic import field_validator

from gda.corpus.shards import shard_file
from gda.paths import resolved


class CorpusSource(dg.ConfigurableResource):
    shards_dir: str  # img2dataset output folder: NNNNN.tar (+ NNNNN.parquet)

    # Resolved once, so a run reads the folder the definitions named whatever its working directory.
    @field_validator("shards_dir")
    @classmethod
    def _resolved(cls, value: str) -> str:
        return str(resolved(value))

    def shard_path(self, shard: str) -> Path:
        return shard_file(Path(self.shards_dir), shard)


class DemoCorpusSource(dg.ConfigurableResource):
    """Size and seed of the embedded icon corpus (see gda.corpus.icons)."""

    n_images: int = 3000
    n_shards: int = 6
    resolution: int = 16
    seed: int = 0
    n_heldout_prompts: int = 600
    heldout_prompts: str  # parquet file of prompts kept out of training, for query generation
