"""Partitions: training shards arrive over time (dynamic), and so do batches of generated queries."""

import dagster as dg

shard_partitions = dg.DynamicPartitionsDefinition(name="shards")
query_batch_partitions = dg.DynamicPartitionsDefinition(name="query_batches")


def every_partition(*assets: str) -> dict[str, dg.AssetIn]:
    """Inputs that load every partition of each named upstream asset, as a dict keyed by partition."""
    return {name: dg.AssetIn(partition_mapping=dg.AllPartitionMapping()) for name in assets}
