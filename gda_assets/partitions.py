"""Partitions: training shards arrive over time (dynamic), and so do batches of generated queries."""

import dagster as dg

shard_partitions = dg.DynamicPartitionsDefinition(name="shards")
query_batch_partitions = dg.DynamicPartitionsDefinition(name="query_batches")
