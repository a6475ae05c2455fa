"""Teacher assets: the candidates each query's attribution is computed over (so far: DINO kNN)."""

import dagster as dg
import numpy as np
import polars as pl

from gda import tables
from gda.arrays import IdArray
from gda_assets.checks import Partition, column_schema, table_check_results, table_check_specs
from gda_assets.partitions import query_batch_partitions
from resources import TeacherSettings, Warehouse


@dg.asset(
    group_name="teacher",
    partitions_def=query_batch_partitions,
    ins={
        "image_features": dg.AssetIn(partition_mapping=dg.AllPartitionMapping()),
        "query_image_features": dg.AssetIn(),
    },
    io_manager_key="warehouse_io",
    kinds={"faiss", "duckdb"},
    metadata={"partition_expr": "batch", "dagster/column_schema": column_schema("dino_candidates")},
    check_specs=table_check_specs("dino_candidates"),
    pool="duckdb",
    description="For each query of the batch, the K nearest training images by image-feature cosine (FAISS; "
    "the teacher scores only these) and a random sample of other training images as negatives.",
)
def dino_candidates(
    context: dg.AssetExecutionContext,
    teacher: TeacherSettings,
    warehouse: Warehouse,
    image_features: dict[str, IdArray],
    query_image_features: IdArray,
):
    from gda.candidates import candidates

    warehouse.ensure_tables()
    shards = [image_features[key] for key in sorted(image_features)]
    frame = candidates(
        np.concatenate([a.ids for a in shards]),
        np.concatenate([a.values for a in shards]),
        query_image_features.ids,
        query_image_features.values,
        k=teacher.k_candidates,
        n_negatives=teacher.n_negatives,
        seed=teacher.seed,
    )
    frame = tables.conform("dino_candidates", frame.with_columns(batch=pl.lit(context.partition_key)))
    yield dg.Output(frame, metadata={"dagster/row_count": frame.height, "k": teacher.k_candidates})
    yield from table_check_results(warehouse, "dino_candidates", frame.height, Partition("batch", context.partition_key))
