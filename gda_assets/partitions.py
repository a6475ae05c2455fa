"""Partitions: training shards arrive over time (dynamic), and so do batches of generated queries; and the
automation that carries a new shard through its per-shard assets."""

import dagster as dg

shard_partitions = dg.DynamicPartitionsDefinition(name="shards")
query_batch_partitions = dg.DynamicPartitionsDefinition(name="query_batches")


def every_partition(*assets: str) -> dict[str, dg.AssetIn]:
    """Inputs that load every partition of each named upstream asset, as a dict keyed by partition."""
    return {name: dg.AssetIn(partition_mapping=dg.AllPartitionMapping()) for name in assets}


# Every per-shard asset and the index: a new shard partition is materialized as soon as its upstream
# partition is, and a new upstream version (a retrained model, a new embedder) refreshes what depends on it.
# Assets over the whole corpus (the model, factors, query batches, the embedder) have no condition: they
# are re-run on purpose, never because a shard arrived.
ON_NEW_SHARDS = dg.AutomationCondition.eager()
