"""Teacher assets: DINO kNN candidates, EK-FAC factors, query-independent training-side data, and the AbU+
scores of each query's candidates."""

import dagster as dg
import numpy as np
import polars as pl

from gda import tables
from gda.arrays import IdArray
from gda_assets.checks import Partition, column_schema, table_check_results, table_check_specs
from gda.diffusion.card import weights_version
from gda_assets.model import load_bundle
from gda.teacher import TeacherConfig, timesteps
from gda_assets.partitions import query_batch_partitions, shard_partitions
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

    from gda.ekfac import DiffusionItems, fit_diffusion_factors, save_factors

    bundle, card = load_bundle(artifacts, compute.device)
    rows = warehouse.named("corpus_for_training")
    images, states = _images_and_states(bundle, corpus, rows)
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


def _teacher_config(teacher: TeacherSettings) -> TeacherConfig:
    return TeacherConfig(**teacher.model_dump(include=set(TeacherConfig.__dataclass_fields__)))


def _images_and_states(bundle, corpus: CorpusSource, rows: pl.DataFrame):
    """The images of ``rows`` at the model's resolution and the prompt states of their first captions: the
    pairing the EK-FAC fit, the scores and the student all use."""
    from gda.diffusion.data import load_corpus_images

    images = load_corpus_images(rows, corpus.shard_path, bundle.image_size)
    return images, bundle.text.encode_prompts(rows["captions"].list.first().to_list())


def _shard_items(bundle, corpus: CorpusSource, warehouse: Warehouse, shard: str):
    """A shard's images, first-caption prompt states and ids."""
    rows = warehouse.named("shard_training_items", [shard])
    return *_images_and_states(bundle, corpus, rows), rows["id"].to_list()


def _finite_items(bundle, corpus: CorpusSource, warehouse: Warehouse, artifacts: Artifacts, shards: list[str]):
    """For the finite teacher: a function from train ids to (images, prompt states, baseline losses)."""
    import torch

    from gda import arrays

    baseline = [arrays.load(artifacts.path("baseline_losses") / f"{shard}.safetensors") for shard in shards]
    baseline_of = {int(i): torch.from_numpy(v) for array in baseline for i, v in zip(array.ids, array.values)}

    def items(ids: list[int]):
        rows = warehouse.query("SELECT id, shard, key, captions FROM training_images WHERE list_contains(?, id)", [ids])
        rows = pl.DataFrame({"id": ids}).join(rows, on="id", how="left", maintain_order="left")
        images, states = _images_and_states(bundle, corpus, rows)
        return images, states, torch.stack([baseline_of[i] for i in ids])

    return items


@dg.asset(
    group_name="teacher",
    partitions_def=shard_partitions,
    deps=["diffusion_model", "training_images"],
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    description="First-order teacher data, query-independent: for every image of the shard and both flips, "
    "the K/V output gradients summed over the fixed scoring draws (G_z); with the caption states (A_z) they "
    "give each image's gradient G_zᵀA_z, so scoring a query is a few matrix products.",
)
def training_gradients(
    context: dg.AssetExecutionContext, compute: Compute, corpus: CorpusSource, warehouse: Warehouse,
    artifacts: Artifacts, teacher: TeacherSettings,
) -> dg.MaterializeResult:
    from gda.ekfac import select_modules
    from gda.unlearning import save_training_side, training_side

    bundle, card = load_bundle(artifacts, compute.device)
    images, states, ids = _shard_items(bundle, corpus, warehouse, context.partition_key)
    config = _teacher_config(teacher)
    side = training_side(
        bundle, select_modules(bundle.unet, teacher.modules), images, states, ids, config.seed, timesteps(config), config.batch_size
    )
    path = artifacts.path("training_gradients") / f"{context.partition_key}.safetensors"
    save_training_side(path, side)
    return dg.MaterializeResult(metadata={"items": len(ids), "model_version": card.version, "path": dg.MetadataValue.path(str(path))})


@dg.asset(
    group_name="teacher",
    partitions_def=shard_partitions,
    deps=["diffusion_model", "training_images"],
    io_manager_key="array_io",
    kinds={"pytorch"},
    pool="gpu",
    description="L(z, θ0) of every image of the shard and its flip on the fixed scoring draws: query-independent, "
    "computed once and reused by every query of the finite teacher.",
)
def baseline_losses(
    context: dg.AssetExecutionContext, compute: Compute, corpus: CorpusSource, warehouse: Warehouse,
    artifacts: Artifacts, teacher: TeacherSettings,
) -> dg.Output[IdArray]:
    from gda.unlearning import baseline_losses as losses

    bundle, card = load_bundle(artifacts, compute.device)
    images, states, ids = _shard_items(bundle, corpus, warehouse, context.partition_key)
    config = _teacher_config(teacher)
    values = losses(bundle, images, states, ids, config.seed, timesteps(config), config.batch_size)
    array = IdArray(ids=np.asarray(ids, dtype=np.int64), values=values.numpy(), metadata={"model_version": card.version})
    return dg.Output(array, metadata={"items": len(ids), "mean_loss": float(values.mean()), "model_version": card.version})


@dg.asset(
    group_name="teacher",
    partitions_def=query_batch_partitions,
    deps=["dino_candidates", "ekfac_factors", "generated_queries", "training_gradients", "baseline_losses"],
    io_manager_key="warehouse_io",
    kinds={"pytorch", "duckdb"},
    metadata={"partition_expr": "batch", "dagster/column_schema": column_schema("abu_scores")},
    check_specs=table_check_specs("abu_scores"),
    pool="gpu",
    description="AbU+ scores of every DINO candidate of every query in the batch: one EK-FAC Newton step that "
    "unlearns the exact generated sample, then τ = L(z, θ′) − L(z, θ0) (finite mode) or its linearisation "
    "(first-order mode, the default), ranked per query.",
)
def abu_scores(
    context: dg.AssetExecutionContext, compute: Compute, corpus: CorpusSource, warehouse: Warehouse,
    artifacts: Artifacts, teacher: TeacherSettings,
):
    import hashlib
    import json


    from gda import teacher as science
    from gda.ekfac import load_factors, select_modules
    from gda.queries import load_generated
    from gda.unlearning import concat_sides, load_training_side

    batch_key = context.partition_key
    warehouse.ensure_tables()
    bundle, card = load_bundle(artifacts, compute.device)
    config = _teacher_config(teacher)
    modules = select_modules(bundle.unet, teacher.modules)
    factors = load_factors(artifacts.path("ekfac_factors"), list(modules))
    generated = load_generated(artifacts.path("generated_queries") / f"{batch_key}.safetensors")
    pairs = warehouse.named("batch_candidates", [batch_key])
    candidates = {q: group["train_id"].to_list() for (q,), group in pairs.group_by("query_id", maintain_order=True)}
    batch = science.QueryBatch(generated.query_ids.tolist(), generated.samples, generated.prompt_states, candidates)
    steps = science.unlearning_deltas(bundle, modules, factors, batch, config)
    shards = sorted(context.instance.get_dynamic_partitions(shard_partitions.name))
    if config.mode == "first_order":
        side = concat_sides([load_training_side(artifacts.path("training_gradients") / f"{s}.safetensors") for s in shards])
        scores = science.first_order_scores(side, steps, batch)
    elif config.mode == "finite":
        items = _finite_items(bundle, corpus, warehouse, artifacts, shards)
        scores = science.finite_scores(bundle, modules, steps, batch, items, config)
    else:
        raise dg.Failure(f"teacher.mode must be 'first_order' or 'finite', got {config.mode!r}")
    config_hash = hashlib.sha256(json.dumps(teacher.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    frame = tables.conform(
        "abu_scores",
        science.score_rows(scores, batch).with_columns(
            batch=pl.lit(batch_key),
            mode=pl.lit(config.mode),
            model_version=pl.lit(card.version),
            factors_version=pl.lit(weights_version(artifacts.path("ekfac_factors"))),
            config_hash=pl.lit(config_hash),
        ),
    )
    etas = [step.eta for step in steps]
    yield dg.Output(frame, metadata={"dagster/row_count": frame.height, "queries": len(batch.query_ids), "mode": config.mode, "eta_median": float(np.median(etas))})
    yield from table_check_results(warehouse, "abu_scores", frame.height, Partition("batch", batch_key))
