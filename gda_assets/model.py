"""Model assets: the text-to-image model, the query prompts, the generated queries and their features."""

import hashlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import polars as pl

from gda import features, plots, tables
from gda.model_card import (
    LATENT_ENCODING,
    ModelCard,
    corpus_fingerprint,
    read_card,
    weights_dir,
    weights_version,
    write_card,
)
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
)

PREVIEW_PROMPTS = 16


def _train_scratch(source: DiffusionSource, corpus: CorpusSource, rows: pl.DataFrame, folder: Path, log) -> ModelCard:
    from gda.diffusion import ScratchModelConfig, build_from_scratch, save, train
    from gda.diffusion.data import load_corpus_images

    config = ScratchModelConfig(**source.model.model_dump())
    images = load_corpus_images(rows, corpus.shard_path, config.sample_size)
    log.info(f"training from scratch on {len(images)} images for {source.training.steps} steps")
    bundle = build_from_scratch(config)
    training = source.training.model_dump()
    result = train(bundle, images, rows["captions"].to_list(), progress=True, **training)
    save(bundle, folder / "weights")
    return ModelCard(
        kind="scratch",
        weights="weights",
        version=weights_version(folder / "weights"),
        n_training_images=len(images),
        model_config=asdict(config),
        training=training,
        loss_curve=result.loss_curve,
        train_seconds=result.seconds,
        parameters=sum(p.numel() for p in bundle.unet.parameters()),
        command="gda demo --retrain",
    )


@dg.asset(
    code_version="1",
    group_name="model",
    deps=["training_images"],
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
    from gda.diffusion import load, load_pretrained, sample

    started = time.perf_counter()
    folder = artifacts.fresh("diffusion_model")
    rows = warehouse.named("corpus_for_training")
    fingerprint = corpus_fingerprint(rows["id"].to_list(), rows["sha256"].to_list(), rows["captions"].to_list())
    if diffusion.kind == "pretrained":
        # DiffusionSource refuses a pretrained kind without an existing folder, and resolves the path.
        path = Path(diffusion.pretrained_path)
        card = ModelCard(
            kind="pretrained",
            weights=str(path),
            version=weights_version(path),
            command="registered",
            model_config={"latents": LATENT_ENCODING},
        )
        bundle = load_pretrained(path)
    else:
        shipped = Path(diffusion.shipped_checkpoint) if diffusion.shipped_checkpoint else None
        shipped_card = read_card(shipped) if shipped and (shipped / "model_card.json").exists() else None
        if not diffusion.retrain and shipped_card and shipped_card.corpus_fingerprint == fingerprint:
            context.log.info(f"using the shipped checkpoint {shipped} (trained on this exact corpus)")
            shutil.copytree(shipped, folder, dirs_exist_ok=True)
            card = ModelCard(**{**asdict(shipped_card), "shipped": True})
        else:
            card = _train_scratch(diffusion, corpus, rows, folder, context.log)
        card = ModelCard(**{**asdict(card), "corpus_fingerprint": fingerprint})
        bundle = load(weights_dir(folder, card))
    write_card(folder, card)
    artifacts.publish("diffusion_model", folder)

    bundle = bundle.to(compute.device)
    preview = (
        rows["captions"]
        .list.first()
        .gather_every(max(1, rows.height // PREVIEW_PROMPTS))
        .head(PREVIEW_PROMPTS)
        .to_list()
    )
    result = sample(bundle, preview, list(range(len(preview))), **diffusion.sampling.model_dump())
    grid = plots.image_grid_png(
        result.images.permute(0, 2, 3, 1).cpu().numpy(), preview, title="samples for training captions"
    )
    metadata: dict[str, object] = {
        "kind": card.kind,
        "version": card.version,
        "shipped_checkpoint": card.shipped,
        "corpus_fingerprint": fingerprint,
        "parameters": sum(p.numel() for p in bundle.unet.parameters()),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "samples": png_markdown(grid, "samples"),
        "model_card": dg.MetadataValue.path(str(artifacts.path("diffusion_model") / "model_card.json")),
    }
    if card.loss_curve:
        curve = plots.line_plot_png(
            {"train loss": card.loss_curve}, "training loss", "logged interval", "loss", log_y=True
        )
        metadata["loss_curve"] = png_markdown(curve, "training loss")
        metadata["train_seconds"] = round(card.train_seconds or 0.0, 1)
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(card.version))


def build_query_prompts(embedded: bool) -> dg.AssetsDefinition:
    """Query prompts come from the embedded corpus's held-out prompts, or for a user's corpus from
    ``query_plan.prompts_file`` (else captions of training images)."""

    @dg.asset(
        code_version="1",
        group_name="model",
        deps=["demo_corpus"] if embedded else ["training_images"],
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
        yield dg.Output(frame, metadata={"dagster/row_count": frame.height, "batches": batches, "splits": split_counts})
        yield from table_check_results(warehouse, "query_prompts", frame.height)

    return query_prompts


@dg.asset(
    code_version="1",
    group_name="model",
    partitions_def=query_batch_partitions,
    deps=["diffusion_model", "query_prompts"],
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
    import torch

    from gda.diffusion import sample, to_pil
    from gda.diffusion.quality import score_colours
    from gda.queries import GeneratedBatch, colours_of, png_bytes, save_generated

    batch = context.partition_key
    warehouse.ensure_tables()
    prompts = warehouse.named("batch_prompts", [batch])
    bundle, card = open_model(artifacts.path("diffusion_model"), compute.device)
    sampling = diffusion.sampling
    result = sample(
        bundle,
        prompts["prompt"].to_list(),
        prompts["seed"].to_list(),
        **sampling.model_dump(),
        dtype=compute.torch_dtype(),
    )
    images = to_pil(result.images)
    folder = artifacts.path("generated_queries") / batch
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for image, query in zip(images, prompts.iter_rows(named=True), strict=True):
        data = png_bytes(image)
        path = folder / f"{query['query_id']}.png"
        path.write_bytes(data)
        rows.append({**query, "image_path": str(path), "image_sha256": hashlib.sha256(data).hexdigest()})
    query_ids = torch.tensor(prompts["query_id"].to_list(), dtype=torch.int64)
    save_generated(
        folder.with_suffix(".safetensors"), GeneratedBatch(query_ids, result.samples.cpu(), result.prompt_states.cpu())
    )
    colours = colours_of(images, prompts["extra"].to_list())
    frame = tables.conform(
        "generated_queries",
        pl.DataFrame(rows)
        .with_columns(
            pl.lit(batch).alias("batch"),
            pl.lit(sampling.steps).alias("steps"),
            pl.lit(sampling.guidance_scale).alias("guidance_scale"),
            pl.lit(sampling.guidance_rescale).alias("guidance_rescale"),
            pl.lit(card.version).alias("model_version"),
        )
        .hstack(
            pl.DataFrame(
                colours, schema={k: pl.String for k in ("fg_expected", "bg_expected", "fg_detected", "bg_detected")}
            )
        ),
    )
    metadata: dict[str, object] = {"dagster/row_count": frame.height, "model_version": card.version}
    scored = frame.filter(pl.col("fg_expected").is_not_null())
    if scored.height:
        detected = list(zip(scored["fg_detected"], scored["bg_detected"]))
        accuracy = score_colours(detected, scored["fg_expected"].to_list(), scored["bg_expected"].to_list())
        metadata |= {
            "fg_accuracy": accuracy.fg,
            "bg_accuracy": accuracy.bg,
            "both_accuracy": accuracy.both,
            "colour_scored": accuracy.n,
        }
    labels = [f"{q}: {p}" for q, p in zip(prompts["query_id"].to_list(), prompts["prompt"].to_list())]
    gallery = plots.image_grid_png(
        [image for image in result.images.permute(0, 2, 3, 1).cpu().numpy()[:32]], labels[:32]
    )
    metadata["gallery"] = png_markdown(gallery, f"generated queries {batch}")
    yield dg.Output(frame, metadata=metadata)
    yield from table_check_results(warehouse, "generated_queries", frame.height, Partition("batch", batch))


@dg.multi_asset(
    outs={
        "query_image_features": dg.AssetOut(
            io_manager_key="array_io",
            kinds={"pytorch"},
            code_version="1",
            description="Image features of the generated queries.",
        ),
        "query_text_features": dg.AssetOut(
            io_manager_key="array_io",
            kinds={"pytorch"},
            code_version="1",
            description="Text features of the query prompts.",
        ),
    },
    partitions_def=query_batch_partitions,
    deps=["generated_queries"],
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
        ("query_image_features", features.image_features(encoders.image(compute.device, compute.dtype), ids, images)),
        (
            "query_text_features",
            features.text_features(encoders.text(compute.device, compute.dtype), ids, queries["prompt"].to_list()),
        ),
    ):
        yield dg.Output(
            array, output_name=name, metadata={"rows": len(ids), "encoder_version": array.metadata["version"]}
        )
