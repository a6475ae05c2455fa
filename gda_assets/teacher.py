"""Teacher assets: DINO kNN candidates, EK-FAC factors, query-independent training-side data, and the AbU+
scores of each query's candidates."""

import dagster as dg
import numpy as np
import polars as pl

from gda import layout, tables
from gda.agreement import MODES_AGREE, MODES_AGREE_MIN_SPEARMAN, RESEEDED_AGREE, RESEEDED_MIN_SPEARMAN, AgreementCheck
from gda.arrays import IdArray
from gda.model_card import read_card, weights_version
from gda.registry import open_model
from gda_assets.checks import Partition, column_schema, table_check_results, table_check_specs
from gda_assets.lineage import column_lineage
from gda_assets.partitions import ON_NEW_SHARDS, every_partition, query_batch_partitions, shard_partitions
from resources import Artifacts, Compute, CorpusSource, TeacherSettings, Warehouse, home_store


@dg.asset(
    code_version="1",
    group_name="teacher",
    partitions_def=query_batch_partitions,
    ins={**every_partition(layout.IMAGE_FEATURES), layout.QUERY_IMAGE_FEATURES: dg.AssetIn()},
    io_manager_key="batch_tables_io",
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
    yield dg.Output(
        frame,
        metadata={
            "dagster/row_count": frame.height,
            "k": teacher.k_candidates,
            "dagster/column_lineage": column_lineage("dino_candidates"),
        },
    )
    yield from table_check_results(
        warehouse, "dino_candidates", frame.height, Partition("batch", context.partition_key)
    )


@dg.asset(
    code_version="1",
    group_name="teacher",
    deps=[layout.DIFFUSION_MODEL, layout.TRAINING_IMAGES],
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
    from gda.teacher_data import fit_factors

    bundle, card = open_model(artifacts.path(layout.DIFFUSION_MODEL), compute.device)
    folder = artifacts.fresh(layout.EKFAC_FACTORS)
    fit = fit_factors(bundle, card, home_store(artifacts, warehouse, corpus), teacher.config(), folder)
    version = weights_version(folder)
    artifacts.publish(layout.EKFAC_FACTORS, folder)
    context.log.info(f"fitted EK-FAC on {fit.images} images x {fit.draws} draws in {fit.seconds:.1f} s")
    return dg.MaterializeResult(
        metadata={
            "modules": len(fit.module_names),
            "module_names": dg.MetadataValue.json(fit.module_names),
            "items": fit.images * fit.draws,
            "fit_seconds": round(fit.seconds, 1),
            "model_version": card.version,
            "version": version,
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    group_name="teacher",
    partitions_def=shard_partitions,
    deps=[layout.DIFFUSION_MODEL, layout.TRAINING_IMAGES],
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    automation_condition=ON_NEW_SHARDS,
    code_version="1",
    description="First-order teacher data, query-independent: for every image of the shard and both flips, "
    "the K/V output gradients summed over the fixed scoring draws (G_z); with the caption states (A_z) they "
    "give each image's gradient G_zᵀA_z, so scoring a query is a few matrix products.",
)
def training_gradients(
    context: dg.AssetExecutionContext,
    compute: Compute,
    corpus: CorpusSource,
    warehouse: Warehouse,
    artifacts: Artifacts,
    teacher: TeacherSettings,
) -> dg.MaterializeResult:
    from gda.teacher_data import write_training_side

    bundle, card = open_model(artifacts.path(layout.DIFFUSION_MODEL), compute.device)
    path = artifacts.file(layout.TRAINING_GRADIENTS, context.partition_key)
    store = home_store(artifacts, warehouse, corpus)
    items = write_training_side(bundle, card, store, teacher.config(), context.partition_key, path)
    return dg.MaterializeResult(
        metadata={"items": items, "model_version": card.version, "path": dg.MetadataValue.path(str(path))}
    )


@dg.asset(
    group_name="teacher",
    partitions_def=shard_partitions,
    # training_gradients: its file holds these very losses when made by the same model and draws.
    deps=[layout.DIFFUSION_MODEL, layout.TRAINING_IMAGES, layout.TRAINING_GRADIENTS],
    io_manager_key="array_io",
    kinds={"pytorch"},
    pool="gpu",
    automation_condition=ON_NEW_SHARDS,
    code_version="1",
    description="L(z, θ0) of every image of the shard and its flip on the fixed scoring draws: query-independent, "
    "computed once and reused by every query of the finite teacher. Taken from the shard's training_gradients "
    "file when that was made by the same model and draws (its forward pass computed exactly these losses), "
    "else from a forward pass of its own.",
)
def baseline_losses(
    context: dg.AssetExecutionContext,
    compute: Compute,
    corpus: CorpusSource,
    warehouse: Warehouse,
    artifacts: Artifacts,
    teacher: TeacherSettings,
) -> dg.Output[IdArray]:
    from gda.teacher_data import shard_baselines

    card = read_card(artifacts.path(layout.DIFFUSION_MODEL))
    store = home_store(artifacts, warehouse, corpus)
    baselines = shard_baselines(store, card, teacher.config(), context.partition_key, compute.device)
    return dg.Output(
        baselines.array,
        metadata={
            "items": len(baselines.array.ids),
            "mean_loss": baselines.mean_loss,
            "model_version": card.version,
            "source": baselines.source,
        },
    )


def _agreement_results(checks: list[AgreementCheck]) -> list[dg.AssetCheckResult]:
    return [
        dg.AssetCheckResult(
            check_name=check.name,
            asset_key=layout.ABU_SCORES,
            passed=check.passed,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"{check.compared}: Spearman min {check.summary['spearman_min']:.3f} "
            f"(needs >= {check.min_spearman})",
            metadata={
                **check.summary,
                "compared": check.compared,
                "candidates": check.candidates,
                "min_spearman_required": check.min_spearman,
            },
        )
        for check in checks
    ]


def _abu_check_specs() -> list[dg.AssetCheckSpec]:
    return table_check_specs("abu_scores") + [
        dg.AssetCheckSpec(
            MODES_AGREE,
            asset=layout.ABU_SCORES,
            description="On a few queries per batch, the other teacher mode (finite step vs first order) ranks the "
            f"nearest DINO candidates with Spearman >= {MODES_AGREE_MIN_SPEARMAN} against the stored scores.",
        ),
        dg.AssetCheckSpec(
            RESEEDED_AGREE,
            asset=layout.ABU_SCORES,
            description="On the same queries, a teacher with other query draws agrees with Spearman >= "
            f"{RESEEDED_MIN_SPEARMAN}; its Spearman and top-50 overlap measure the teacher's own noise, which caps "
            "any student.",
        ),
    ]


@dg.asset(
    code_version="1",
    group_name="teacher",
    partitions_def=query_batch_partitions,
    deps=[
        layout.DIFFUSION_MODEL,
        layout.TRAINING_IMAGES,
        layout.DINO_CANDIDATES,
        layout.EKFAC_FACTORS,
        layout.GENERATED_QUERIES,
        layout.TRAINING_GRADIENTS,
    ],
    ins=every_partition(layout.BASELINE_LOSSES),
    io_manager_key="batch_tables_io",
    kinds={"pytorch", "duckdb"},
    metadata={"partition_expr": "batch", "dagster/column_schema": column_schema("abu_scores")},
    check_specs=_abu_check_specs(),
    pool="gpu",
    description="AbU+ scores of every query in the batch: one EK-FAC Newton step that unlearns the exact "
    "generated sample, then τ = L(z, θ′) − L(z, θ0) of each DINO candidate (finite mode) or its "
    "linearisation (first-order mode, the default), ranked per query. In first-order mode the queries of "
    "the full-ranking splits (default: all) are ranked against every training image.",
)
def abu_scores(
    context: dg.AssetExecutionContext,
    compute: Compute,
    corpus: CorpusSource,
    warehouse: Warehouse,
    artifacts: Artifacts,
    teacher: TeacherSettings,
    baseline_losses: dict[str, IdArray],
):
    from gda.batch_scores import score_batch

    batch_key = context.partition_key
    warehouse.ensure_tables()
    bundle, card = open_model(artifacts.path(layout.DIFFUSION_MODEL), compute.device)
    store = home_store(artifacts, warehouse, corpus)
    try:
        scored = score_batch(bundle, card, store, teacher.config(), baseline_losses, batch_key)
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    yield dg.Output(
        scored.frame,
        metadata={
            "dagster/row_count": scored.frame.height,
            "queries": scored.queries,
            "mode": teacher.mode,
            "candidates_per_query": scored.candidates_per_query,
            "eta_median": scored.eta_median,
            "dagster/column_lineage": column_lineage("abu_scores"),
        },
    )
    yield from table_check_results(warehouse, "abu_scores", scored.frame.height, Partition("batch", batch_key))
    yield from _agreement_results(scored.checks)
