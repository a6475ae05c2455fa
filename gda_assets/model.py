"""Model assets: the text-to-image model, the query prompts, the generated queries and their features."""

import time
from pathlib import Path

import dagster as dg
import polars as pl

from gda import features, layout
from gda.model_card import CARD
from gda.registry import open_model
from gda_assets.checks import Partition, column_schema, table_check_results, table_check_specs
from gda_assets.metadata import png_markdown
from gda_assets.partitions import query_batch_partitions
from resources import (
    Artifacts,
    Compute,
    CorpusSource,
    DemoCorpusSource,
    DiffusionSource,
    Encoders,
    QueryPlan,
    Warehouse,
    home_store,
)


@dg.asset(
    code_version="1",
    group_name="model",
    deps=[layout.TRAINING_IMAGES],
    kinds={"pytorch"},
    pool="gpu",
    description="The text-to-image diffusion model: a small UNet trained from scratch on every ingested "
    "shard (or the shipped checkpoint when it was trained on exactly this corpus), or a local Stable "
    "Diffusion folder registered as is. Writes model_card.json with the recipe and a version hash.",
)
def diffusion_model(
    context: dg.AssetExecutionContext,
    compute: Compute,
    corpus: CorpusSource,
    warehouse: Warehouse,
    artifacts: Artifacts,
    diffusion: DiffusionSource,
) -> dg.MaterializeResult:
    from gda.model_source import model_summary, register_model

    started = time.perf_counter()
    source = diffusion.config()
    folder = artifacts.fresh(layout.DIFFUSION_MODEL)
    rows = warehouse.named("corpus_for_training")
    model = register_model(source, home_store(artifacts, warehouse, corpus), rows, folder, context.log.info)
    artifacts.publish(layout.DIFFUSION_MODEL, folder)
    card = model.card
    summary = model_summary(model.bundle, card, rows, source.sampling, compute.device)
    metadata: dict[str, object] = {
        "kind": card.kind,
        "version": card.version,
        "shipped_checkpoint": card.shipped,
        "corpus_fingerprint": model.corpus_fingerprint,
        "parameters": summary.parameters,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "samples": png_markdown(summary.samples_png, "samples"),
        "model_card": dg.MetadataValue.path(str(artifacts.path(layout.DIFFUSION_MODEL) / CARD)),
    }
    if summary.loss_curve_png is not None:
        metadata["loss_curve"] = png_markdown(summary.loss_curve_png, "training loss")
        metadata["train_seconds"] = round(card.train_seconds or 0.0, 1)
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(card.version))


def build_query_prompts(embedded: bool) -> dg.AssetsDefinition:
    """Query prompts come from the embedded corpus's held-out prompts, or for a user's corpus from
    ``query_plan.prompts_file`` (else captions of training images)."""

    @dg.asset(
        code_version="1",
        group_name="model",
        deps=[layout.DEMO_CORPUS] if embedded else [layout.TRAINING_IMAGES],
        io_manager_key="warehouse_io",
        kinds={"duckdb"},
        metadata={"dagster/column_schema": column_schema("query_prompts")},
        check_specs=table_check_specs("query_prompts"),
        pool="duckdb",
        description="Prompts for the train / val / test generated queries, grouped into query batches "
        "(registered as query_batches partitions).",
    )
    def query_prompts(
        context: dg.AssetExecutionContext,
        query_plan: QueryPlan,
        demo_corpus_source: DemoCorpusSource,
        warehouse: Warehouse,
    ):
        from gda.queries import QueryCounts, heldout_candidates, plan_queries, prompt_file_candidates

        warehouse.ensure_tables()
        if embedded:
            candidates = heldout_candidates(pl.read_parquet(demo_corpus_source.heldout_prompts))
        elif query_plan.prompts_file:
            candidates = prompt_file_candidates(Path(query_plan.prompts_file))
        else:
            captions = warehouse.query(
                "SELECT caption AS prompt, NULL::VARCHAR AS extra FROM training_images ORDER BY id"
            )
            context.log.warning("no prompts_file: queries regenerate training captions, so they are not held out")
            candidates = captions
        counts = QueryCounts(**query_plan.model_dump(exclude={"prompts_file"}))
        frame = plan_queries(candidates, counts)
        batches = sorted(set(frame["batch"].to_list()))
        stale = set(context.instance.get_dynamic_partitions(query_batch_partitions.name)) - set(batches)
        for key in sorted(stale):
            context.instance.delete_dynamic_partition(query_batch_partitions.name, key)
        context.instance.add_dynamic_partitions(query_batch_partitions.name, batches)
        split_counts = dict(frame.group_by("split").len().iter_rows())
        distinct = dict(frame.group_by("split").agg(pl.col("prompt").n_unique()).iter_rows())
        if distinct.get("train", 0) < split_counts.get("train", 0):
            context.log.warning(f"{distinct['train']} distinct train prompts for {split_counts['train']} train queries")
        yield dg.Output(
            frame,
            metadata={
                "dagster/row_count": frame.height,
                "batches": batches,
                "splits": split_counts,
                "distinct_prompts": distinct,
            },
        )
        yield from table_check_results(warehouse, "query_prompts", frame.height)

    return query_prompts


@dg.asset(
    code_version="1",
    group_name="model",
    partitions_def=query_batch_partitions,
    deps=[layout.DIFFUSION_MODEL, layout.QUERY_PROMPTS],
    io_manager_key="warehouse_io",
    kinds={"pytorch", "duckdb"},
    metadata={"partition_expr": "batch", "dagster/column_schema": column_schema("generated_queries")},
    check_specs=table_check_specs("generated_queries"),
    pool="gpu",
    description="DDIM samples for a batch of query prompts, with the recorded seed, guidance and steps; the "
    "PNG, the exact final samples and the prompt states used are kept so the teacher unlearns exactly "
    "what was generated.",
)
def generated_queries(
    context: dg.AssetExecutionContext,
    compute: Compute,
    artifacts: Artifacts,
    diffusion: DiffusionSource,
    warehouse: Warehouse,
):
    from gda.generation import generate_queries

    batch = context.partition_key
    warehouse.ensure_tables()
    prompts = warehouse.named("batch_prompts", [batch])
    bundle, card = open_model(artifacts.path(layout.DIFFUSION_MODEL), compute.device)
    generated = generate_queries(
        bundle,
        card,
        prompts,
        diffusion.config().sampling,
        compute.torch_dtype(),
        batch,
        images_folder=artifacts.path(layout.GENERATED_QUERIES) / batch,
        samples_file=artifacts.file(layout.GENERATED_QUERIES, batch),
    )
    frame, accuracy = generated.frame, generated.accuracy
    metadata: dict[str, object] = {"dagster/row_count": frame.height, "model_version": card.version}
    if accuracy is not None:
        metadata |= {
            "fg_accuracy": accuracy.fg,
            "bg_accuracy": accuracy.bg,
            "both_accuracy": accuracy.both,
            "colour_scored": accuracy.n,
        }
    metadata["gallery"] = png_markdown(generated.gallery_png, f"generated queries {batch}")
    yield dg.Output(frame, metadata=metadata)
    yield from table_check_results(warehouse, "generated_queries", frame.height, Partition("batch", batch))


@dg.multi_asset(
    outs={
        layout.QUERY_IMAGE_FEATURES: dg.AssetOut(
            io_manager_key="array_io",
            kinds={"pytorch"},
            code_version="1",
            description="Image features of the generated queries.",
        ),
        layout.QUERY_TEXT_FEATURES: dg.AssetOut(
            io_manager_key="array_io",
            kinds={"pytorch"},
            code_version="1",
            description="Text features of the query prompts.",
        ),
    },
    partitions_def=query_batch_partitions,
    deps=[layout.GENERATED_QUERIES],
    group_name="model",
    pool="gpu",
    description="The same frozen encoders as the training features, applied to generated images and prompts.",
)
def query_features(context: dg.AssetExecutionContext, compute: Compute, encoders: Encoders, warehouse: Warehouse):
    from PIL import Image

    queries = warehouse.named("batch_queries", [context.partition_key])
    ids = queries["query_id"].to_list()
    images = [Image.open(path) for path in queries["image_path"].to_list()]
    for name, array in (
        (
            layout.QUERY_IMAGE_FEATURES,
            features.image_features(encoders.image(compute.device, compute.dtype), ids, images),
        ),
        (
            layout.QUERY_TEXT_FEATURES,
            features.text_features(encoders.text(compute.device, compute.dtype), ids, queries["prompt"].to_list()),
        ),
    ):
        yield dg.Output(
            array, output_name=name, metadata={"rows": len(ids), "encoder_version": array.metadata["version"]}
        )
