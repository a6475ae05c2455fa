"""Where training shards come from: the folder the sensor watches, and the embedded demo corpus spec."""


from pathlib import Path

import dagster as dg


class CorpusSource(dg.ConfigurableResource):
    shards_dir: str  # img2dataset output folder: NNNNN.tar (+ NNNNN.parquet)

    def shard_path(self, shard: str) -> Path:
        return Path(self.shards_dir) / f"{shard}.tar"


class DemoCorpusSource(dg.ConfigurableResource):
    """Size and seed of the embedded icon corpus (see gda.corpus.icons)."""

    n_images: int = 3000
    n_shards: int = 6
    resolution: int = 16
    seed: int = 0
    n_heldout_prompts: int = 600
    heldout_prompts: str  # parquet file of prompts kept out of training, for query generation
