"""Teacher assets: DINO kNN candidates per query and the EK-FAC factors the AbU+ step preconditions with."""

import dagster as dg
import numpy as np
import polars as pl

from gda import tables
from gda.arrays import IdArray
from gda_assets.checks import Partition, column_schema, table_check_results, table_check_specs
from gda.diffusion.card import weights_version
from gda_assets.model import load_bundle
from gda_assets.partitions import query_batch_partitions
from resources import Artifacts, Compute, CorpusSource, TeacherSettings, Warehouse


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


@dg.asset(
    group_name="teacher",
    deps=["diffusion_model", "training_images"],
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    description="EK-FAC factors of the model's selected modules (default: cross-attention K/V) over every "
    "training image with fixed draws, in kronfluence's safetensors layout (factors fitted by kronfluence "
    "at scale load the same way).",
)
def ekfac_factors(
    context: dg.AssetExecutionContext,
    compute: Compute,
    corpus: CorpusSource,
    warehouse: Warehouse,
    artifacts: Artifacts,
    teacher: TeacherSettings,
) -> dg.MaterializeResult:
    import time

    from gda.diffusion.data import load_corpus_images
    from gda.ekfac import DiffusionItems, fit_diffusion_factors, save_factors

    bundle, card = load_bundle(artifacts, compute.device)
    rows = warehouse.named("corpus_for_training")
    images = load_corpus_images(rows, corpus.shard_path, bundle.image_size)
    # The fit sees each image with its first caption: the pairing the student and the scores use too.
    states = bundle.text.encode_prompts(rows["captions"].list.first().to_list())
    items = DiffusionItems(
        bundle, images, states, rows["id"].to_list(), list(range(teacher.fisher_draws)), seed=teacher.seed,
        batch_size=teacher.batch_size, snr_gamma=card.snr_gamma,
    )
    started = time.perf_counter()
    factors = fit_diffusion_factors(items, teacher.modules)
    seconds = time.perf_counter() - started
    folder = artifacts.fresh("ekfac_factors")
    save_factors(factors, folder, factor_arguments={"modules": teacher.modules, "model_version": card.version})
    version = weights_version(folder)
    artifacts.publish("ekfac_factors", folder)
    context.log.info(f"fitted EK-FAC on {len(rows)} images x {teacher.fisher_draws} draws in {seconds:.1f} s")
    return dg.MaterializeResult(
        metadata={
            "modules": len(factors.modules),
            "module_names": dg.MetadataValue.json(list(factors.modules)),
            "items": len(rows) * teacher.fisher_draws,
            "fit_seconds": round(seconds, 1),
            "model_version": card.version,
            "version": version,
        },
        data_version=dg.DataVersion(version),
    )
