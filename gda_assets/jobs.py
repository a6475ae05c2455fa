"""Jobs: what the CLI, the sensor and the UI launch."""

import dagster as dg

from gda_assets.partitions import shard_partitions

# Every asset partitioned by shard: ingest plus features, one run per shard.
shard_job = dg.define_asset_job(
    "shard_job",
    selection=dg.AssetSelection.keys("training_images", "rejected_images", "image_features", "text_features"),
    partitions_def=shard_partitions,
    description="Ingest one shard into DuckDB and compute its image and caption features.",
)

ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.keys("training_images", "rejected_images"),
    partitions_def=shard_partitions,
    description="Ingest one shard into DuckDB (accepted and rejected samples) without features.",
)

demo_corpus_job = dg.define_asset_job(
    "demo_corpus_job", selection=dg.AssetSelection.keys("demo_corpus"), description="Render the embedded corpus."
)
