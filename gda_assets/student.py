"""Student assets: the distilled attribution embedder, the embeddings of every training image, the FAISS
index the query service searches, and the attribution log the service writes (declared, not materialized)."""

import dagster as dg

from gda.arrays import IdArray
from gda_assets.checks import column_schema
from gda_assets.lineage import column_lineage
from gda_assets.metadata import png_markdown
from gda_assets.partitions import ON_NEW_SHARDS, every_partition, shard_partitions
from resources import Artifacts, Compute, IndexSettings, StudentSettings, Warehouse

EMBEDDER = "attribution_embedder"
INDEX = "attribution_index"


@dg.asset(
    code_version="1",
    group_name="student",
    ins=every_partition("image_features", "text_features", "query_image_features", "query_text_features"),
    deps=["abu_scores"],
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
    import time

    import torch

    from gda import plots
    from gda.embedder import EmbedderConfig, save_embedder
    from gda.student import distill, feature_matrix

    torch.set_num_threads(compute.threads or torch.get_num_threads())
    train = feature_matrix(image_features, text_features)
    queries = feature_matrix(query_image_features, query_text_features)
    image_dim = next(iter(image_features.values())).values.shape[1]
    config = EmbedderConfig(
        input_dim=train[1].shape[1],
        image_dim=image_dim,
        **student.model_dump(
            include={"widths", "dropout", "normalise_parts", "lr", "weight_decay", "batch_size", "epochs", "seed"}
        ),
    )
    started = time.perf_counter()
    try:
        result = distill(
            config,
            warehouse.named("student_scores"),
            train,
            queries,
            student.top_k,
            student.p_negative,
            student.per_query,
            student.val_fraction_l,
        )
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    seconds = time.perf_counter() - started
    folder = artifacts.fresh(EMBEDDER)
    version = save_embedder(folder, result.embedder)
    artifacts.publish(EMBEDDER, folder)
    last = result.history[-1]
    curves = {"train loss": [r.train_loss for r in result.history]}
    if last.val_loss is not None:
        curves["val loss"] = [r.val_loss for r in result.history]
    metadata = {
        "version": version,
        "train_queries": result.train_queries,
        "val_queries": result.val_queries,
        "pairs": result.pairs,
        "epochs": len(result.history),
        "train_seconds": round(seconds, 1),
        "final_train_loss": last.train_loss,
        "scale_s": last.scale,
        "loss_curves": png_markdown(plots.line_plot_png(curves, "student loss", "epoch", "BCE"), "student loss"),
    }
    if last.val_map is not None:
        metadata[f"val_map_at_{result.L}"] = last.val_map
        maps = [r.val_map for r in result.history]
        metadata["val_map_curve"] = png_markdown(
            plots.line_plot_png({f"val mAP@{result.L}": maps}, "validation mAP", "epoch", "mAP"), "validation mAP"
        )
    context.log.info(f"embedder {version}: {result.pairs} pairs, {len(result.history)} epochs in {seconds:.1f} s")
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(version))


@dg.asset(
    group_name="student",
    partitions_def=shard_partitions,
    deps=[EMBEDDER],
    ins={"image_features": dg.AssetIn(), "text_features": dg.AssetIn()},
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

    embedder = load_embedder(artifacts.path(EMBEDDER))
    ids, values = feature_matrix(image_features, text_features)
    array = IdArray(ids=ids, values=embedder.embed_training(values), metadata={"embedder_version": embedder.version})
    return dg.Output(array, metadata={"items": len(ids), "embedder_version": embedder.version})


@dg.asset(
    group_name="student",
    ins=every_partition("training_embeddings"),
    deps=[EMBEDDER],
    kinds={"faiss"},
    automation_condition=ON_NEW_SHARDS,
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(
            "count_matches_embeddings",
            asset=INDEX,
            blocking=True,
            description="The index holds exactly one vector per embedded training image, from every embedded shard.",
        )
    ],
    description="FAISS inner-product index of every training embedding (flat; IVF, then IVF-PQ above sizes). A "
    "new shard "
    "is added without a rebuild; a new embedder version, or a changed or removed shard, rebuilds it.",
)
def attribution_index(
    context: dg.AssetExecutionContext,
    artifacts: Artifacts,
    index: IndexSettings,
    training_embeddings: dict[str, IdArray],
):
    from gda.attribution_index import INDEX_FILE, load_index, save_index, update_index
    from gda.embedder import load_embedder

    embedder = load_embedder(artifacts.path(EMBEDDER))
    stale = sorted(k for k, a in training_embeddings.items() if a.metadata.get("embedder_version") != embedder.version)
    if stale:
        raise dg.Failure(
            f"training_embeddings of shards {', '.join(stale)} come from another embedder version; "
            "re-materialize them before the index"
        )
    path = artifacts.path(INDEX) / INDEX_FILE
    current = load_index(path) if path.exists() else None
    updated, action = update_index(current, embedder.version, training_embeddings, index.search_settings())
    save_index(path, updated)
    manifest = updated.manifest
    context.log.info(f"attribution index: {action}")
    yield dg.MaterializeResult(
        metadata={
            "action": action,
            "count": manifest.count,
            "kind": manifest.kind,
            "shards": len(manifest.shards),
            "embedder_version": manifest.embedder_version,
            "version": manifest.version,
            "path": dg.MetadataValue.path(str(path)),
        },
        data_version=dg.DataVersion(manifest.version),
    )
    embedded = sum(len(array.ids) for array in training_embeddings.values())
    yield dg.AssetCheckResult(
        check_name="count_matches_embeddings",
        passed=updated.faiss_index.ntotal == manifest.count == embedded
        and sorted(manifest.shards) == sorted(training_embeddings),
        metadata={"indexed": updated.faiss_index.ntotal, "embedded": embedded, "shards": len(manifest.shards)},
    )


attribution_log = dg.AssetSpec(
    "attribution_log",
    deps=["diffusion_model", EMBEDDER, INDEX, "training_images"],
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
