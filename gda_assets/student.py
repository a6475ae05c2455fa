"""Student assets: the distilled attribution embedder, the embeddings of every training image, the FAISS
index the query service searches, and the attribution log the service writes (declared, not materialized)."""

import dagster as dg

from gda import layout
from gda.arrays import IdArray
from gda_assets.checks import column_schema
from gda_assets.lineage import column_lineage
from gda_assets.metadata import png_markdown
from gda_assets.partitions import ON_NEW_SHARDS, every_partition, shard_partitions
from resources import Artifacts, Compute, IndexSettings, StudentSettings, Warehouse


@dg.asset(
    code_version="1",
    group_name="student",
    ins=every_partition(
        layout.IMAGE_FEATURES, layout.TEXT_FEATURES, layout.QUERY_IMAGE_FEATURES, layout.QUERY_TEXT_FEATURES
    ),
    deps=[layout.ABU_SCORES],
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    description="The distilled attribution embedder: one MLP shared by queries (generated image + prompt "
    "features) and training images (image + first caption), trained with BCE on the teacher's rank labels "
    "of the train-split queries, validated by mAP on the val split.",
)
def attribution_embedder(
    context: dg.AssetExecutionContext,
    compute: Compute,
    student: StudentSettings,
    warehouse: Warehouse,
    artifacts: Artifacts,
    image_features: dict[str, IdArray],
    text_features: dict[str, IdArray],
    query_image_features: dict[str, IdArray],
    query_text_features: dict[str, IdArray],
) -> dg.MaterializeResult:
    from gda.student import distill_and_save

    folder = artifacts.fresh(layout.ATTRIBUTION_EMBEDDER)
    scores = warehouse.named("student_scores")
    try:
        saved = distill_and_save(
            student.config(), scores, image_features, text_features, query_image_features, query_text_features, folder
        )
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    artifacts.publish(layout.ATTRIBUTION_EMBEDDER, folder)
    result, last = saved.result, saved.result.history[-1]
    metadata = {
        "version": saved.version,
        "train_queries": result.train_queries,
        "val_queries": result.val_queries,
        "pairs": result.pairs,
        "epochs": len(result.history),
        "train_seconds": round(saved.seconds, 1),
        "final_train_loss": last.train_loss,
        "scale_s": last.scale,
        "loss_curves": png_markdown(saved.curves.loss_png, "student loss"),
    }
    if saved.curves.val_map_png is not None:
        metadata[f"val_map_at_{result.L}"] = last.val_map
        metadata["val_map_curve"] = png_markdown(saved.curves.val_map_png, "validation mAP")
    context.log.info(
        f"embedder {saved.version}: {result.pairs} pairs, {len(result.history)} epochs in {saved.seconds:.1f} s"
    )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(saved.version))


@dg.asset(
    group_name="student",
    partitions_def=shard_partitions,
    deps=[layout.ATTRIBUTION_EMBEDDER],
    ins={layout.IMAGE_FEATURES: dg.AssetIn(), layout.TEXT_FEATURES: dg.AssetIn()},
    io_manager_key="array_io",
    kinds={"pytorch"},
    pool="gpu",
    automation_condition=ON_NEW_SHARDS,
    code_version="1",
    description="The embedder's unit vectors of a shard's training images (image + first caption), in id "
    "order, tagged with the embedder version that made them.",
)
def training_embeddings(
    context: dg.AssetExecutionContext, artifacts: Artifacts, image_features: IdArray, text_features: IdArray
) -> dg.Output[IdArray]:
    from gda.embedder import load_embedder
    from gda.student import feature_matrix

    embedder = load_embedder(artifacts.path(layout.ATTRIBUTION_EMBEDDER))
    ids, values = feature_matrix(image_features, text_features)
    array = IdArray(ids=ids, values=embedder.embed_training(values), metadata={"embedder_version": embedder.version})
    return dg.Output(array, metadata={"items": len(ids), "embedder_version": embedder.version})


@dg.asset(
    group_name="student",
    ins=every_partition(layout.TRAINING_EMBEDDINGS),
    deps=[layout.ATTRIBUTION_EMBEDDER],
    kinds={"faiss"},
    automation_condition=ON_NEW_SHARDS,
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(
            "count_matches_embeddings",
            asset=layout.ATTRIBUTION_INDEX,
            blocking=True,
            description="The index holds exactly one vector per embedded training image, from every embedded shard.",
        )
    ],
    description="FAISS inner-product index of every training embedding (flat; IVF, then IVF-PQ above sizes). A "
    "new shard is added without a rebuild; a new embedder version, or a changed or removed shard, rebuilds it.",
)
def attribution_index(
    context: dg.AssetExecutionContext,
    artifacts: Artifacts,
    index: IndexSettings,
    training_embeddings: dict[str, IdArray],
):
    from gda.attribution_index import INDEX_FILE, refresh_index
    from gda.embedder import load_embedder

    embedder = load_embedder(artifacts.path(layout.ATTRIBUTION_EMBEDDER))
    path = artifacts.path(layout.ATTRIBUTION_INDEX) / INDEX_FILE
    try:
        refreshed = refresh_index(path, embedder.version, training_embeddings, index.search_settings())
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    manifest, indexed = refreshed.index.manifest, refreshed.index.faiss_index.ntotal
    context.log.info(f"attribution index: {refreshed.action}")
    yield dg.MaterializeResult(
        metadata={
            "action": refreshed.action,
            "count": manifest.count,
            "kind": manifest.kind,
            "shards": len(manifest.shards),
            "embedder_version": manifest.embedder_version,
            "version": manifest.version,
            "path": dg.MetadataValue.path(str(path)),
        },
        data_version=dg.DataVersion(manifest.version),
    )
    yield dg.AssetCheckResult(
        check_name="count_matches_embeddings",
        passed=refreshed.complete,
        metadata={"indexed": indexed, "embedded": refreshed.embedded, "shards": len(manifest.shards)},
    )


attribution_log = dg.AssetSpec(
    layout.ATTRIBUTION_LOG,
    deps=[layout.DIFFUSION_MODEL, layout.ATTRIBUTION_EMBEDDER, layout.ATTRIBUTION_INDEX, layout.TRAINING_IMAGES],
    group_name="serving",
    kinds={"duckdb"},
    metadata={
        "dagster/table_name": "attribution_log",
        "dagster/column_schema": column_schema("attribution_log"),
        "dagster/column_lineage": column_lineage("attribution_log"),
    },
    description="Every answer of gda serve and gda query: the credited training images with their scores and the "
    "model, embedder and index versions that answered. Written by the query service as it answers (not "
    "materialized here); `gda audit` reads it.",
)
