"""Evaluation assets: does the distilled embedder attribute like the teacher? mAP(L) of every method on the
held-out test queries, shown as a table, a bar chart and galleries of the top attributions; and the
counterfactual test of every attribution: retrain without a method's top k and see what the query loses."""

import dagster as dg
import numpy as np
import polars as pl

from gda import tables
from gda.arrays import IdArray
from gda.registry import open_model
from gda_assets.checks import Partition, column_schema, table_check_results, table_check_specs
from gda_assets.metadata import png_markdown
from gda_assets.partitions import every_partition, shard_partitions
from gda_assets.student import EMBEDDER
from gda_assets.teacher import RESEED_OFFSET, build_teacher, training_rows
from resources import Artifacts, Compute, CorpusSource, EvaluationSettings, TeacherSettings, Warehouse


def _teacher_rankings(warehouse: Warehouse) -> dict[int, np.ndarray]:
    stored = warehouse.named("test_rankings")
    if stored.is_empty():
        raise dg.Failure("no teacher scores for test queries; materialize abu_scores for the test batches")
    return {q: g["train_id"].to_numpy() for (q,), g in stored.group_by("query_id", maintain_order=True)}


def _reseeded_rankings(
    context, compute, corpus, warehouse, artifacts, teacher, teacher_rankings
) -> dict[int, np.ndarray]:
    """The teacher's rankings of the same sets with other query draws: the ceiling for any student."""
    import torch

    from gda import teacher as science
    from gda.queries import load_generated
    from gda.unlearning import rank_scores

    bundle, _ = open_model(artifacts.path("diffusion_model"), compute.device)
    shards = sorted(context.instance.get_dynamic_partitions(shard_partitions.name))
    model = build_teacher(bundle, corpus, warehouse, artifacts, teacher, shards)
    batches = warehouse.query("SELECT DISTINCT batch FROM query_prompts WHERE split = 'test' ORDER BY batch")["batch"]
    out = {}
    for batch_key in batches:
        generated = load_generated(artifacts.path("generated_queries") / f"{batch_key}.safetensors")
        ids = [q for q in generated.query_ids.tolist() if q in teacher_rankings]
        sets = {q: sorted(teacher_rankings[q].tolist()) for q in ids}
        every = science.QueryBatch(
            generated.query_ids.tolist(),
            generated.samples,
            generated.prompt_states,
            {q: sets.get(q, []) for q in generated.query_ids.tolist()},
        )
        batch = science.select_queries(every, ids)
        scores = model.scores(model.deltas(batch, model.config.seed + RESEED_OFFSET), batch)
        for query_id, values in scores.items():
            order = np.argsort(rank_scores(torch.from_numpy(values), sets[query_id]).numpy())
            out[query_id] = np.asarray(sets[query_id])[order]
    return out


def _gallery(warehouse, corpus, artifacts, teacher_rankings, distilled, queries: pl.DataFrame, top_k: int) -> bytes:
    """Per query two rows: the generated image then the teacher's top k, and again with the distilled top k."""
    from PIL import Image

    from gda import plots
    from gda.corpus.shards import load_images

    images, labels = [], []
    for query_id, prompt, image_path in queries.iter_rows():
        generated = np.asarray(Image.open(artifacts.path(image_path)).convert("RGB"))
        for name, ranking in (("teacher", teacher_rankings), ("distilled", distilled)):
            ids = ranking[query_id][:top_k].tolist()
            rows = training_rows(warehouse, ids)
            pictures = {}
            for (shard,), group in rows.group_by("shard"):
                pictures |= dict(
                    zip(group["id"], load_images(corpus.shard_path(shard), group["key"].to_list()), strict=True)
                )
            images.append(generated)
            labels.append(f"query {query_id}: {prompt}")
            for rank, (train_id, captions) in enumerate(zip(rows["id"], rows["captions"], strict=True), start=1):
                images.append(np.asarray(pictures[train_id].convert("RGB")))
                labels.append(f"{name} #{rank}: {captions[0]}")
    return plots.image_grid_png(
        images, labels, columns=top_k + 1, title="top attributions: teacher (AbU+) vs distilled"
    )


@dg.asset(
    code_version="1",
    group_name="evaluation",
    ins=every_partition("image_features", "text_features", "query_image_features", "query_text_features"),
    deps=["abu_scores", EMBEDDER],
    kinds={"pytorch", "duckdb"},
    metadata={"dagster/column_schema": column_schema("eval_rank"), "dagster/table_name": "eval_rank"},
    check_specs=table_check_specs("eval_rank", asset="rank_eval"),
    pool="gpu",
    description="mAP(L) of random, image, text, raw concatenation, the distilled embedder and the teacher "
    "with other query draws, against the teacher's ranking of each held-out test query (the same ranked "
    "set for every method); mean ± standard error over queries, with a bar chart and galleries.",
)
def rank_eval(
    context: dg.AssetExecutionContext,
    compute: Compute,
    corpus: CorpusSource,
    warehouse: Warehouse,
    artifacts: Artifacts,
    teacher: TeacherSettings,
    evaluation: EvaluationSettings,
    image_features: dict[str, IdArray],
    text_features: dict[str, IdArray],
    query_image_features: dict[str, IdArray],
    query_text_features: dict[str, IdArray],
):
    from gda import evaluation as science
    from gda import plots
    from gda.embedder import load_embedder
    from gda.student import feature_matrix

    warehouse.ensure_tables()
    teacher_rankings = _teacher_rankings(warehouse)
    train_ids, train_features = feature_matrix(image_features, text_features)
    query_ids, query_features = feature_matrix(query_image_features, query_text_features)
    embedder = load_embedder(artifacts.path(EMBEDDER))
    rows = {int(q): i for i, q in enumerate(query_ids) if int(q) in teacher_rankings}
    rankings = {"random": science.random_rankings(list(teacher_rankings), train_ids, evaluation.seed)}
    for method, (queries, train) in science.method_vectors(embedder, query_features, train_features).items():
        rankings[method] = science.cosine_rankings(queries, train, rows, train_ids)
    rankings["teacher_reseeded"] = _reseeded_rankings(
        context, compute, corpus, warehouse, artifacts, teacher, teacher_rankings
    )
    rankings = {method: science.restrict(ranking, teacher_rankings) for method, ranking in rankings.items()}
    levels = science.levels_for(len(train_ids), evaluation.l_fractions)
    table = science.rank_table(teacher_rankings, rankings, levels).with_columns(
        embedder_version=pl.lit(embedder.version)
    )
    frame = tables.conform("eval_rank", table)

    chart = plots.grouped_bars_png(
        science.by_level(table, "map"), science.by_level(table, "se"), "mAP(L) against the teacher", "mAP"
    )
    shown = warehouse.named("test_queries").select("query_id", "prompt", "image_path").head(evaluation.gallery_queries)
    middle = levels[len(levels) // 2]
    distilled = table.filter((pl.col("method") == "distilled") & (pl.col("L") == middle))["map"][0]
    raw = table.filter((pl.col("method") == "concat_raw") & (pl.col("L") == middle))["map"][0]
    warehouse.replace_table("eval_rank", frame)
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": frame.height,
            "table": dg.MetadataValue.md(science.markdown_table(table)),
            "chart": png_markdown(chart, "mAP(L)"),
            "gallery": png_markdown(
                _gallery(
                    warehouse,
                    corpus,
                    artifacts,
                    teacher_rankings,
                    rankings["distilled"],
                    shown,
                    evaluation.gallery_top_k,
                ),
                "galleries",
            ),
            f"distilled_over_concat_raw_at_{middle}": distilled / raw if raw > 0 else float("nan"),
            "test_queries": len(teacher_rankings),
            "embedder_version": embedder.version,
        },
    )
    yield from table_check_results(warehouse, "eval_rank", frame.height, asset="rank_eval")


def _removal_rankings(
    method: str, query_ids: list[int], teacher_rankings, evaluation: EvaluationSettings, artifacts: Artifacts, features
) -> tuple[dict[int, np.ndarray], str | None]:
    """Each query's ranking of the training set by `method` (best first), and the embedder version if one ranked."""
    from gda import evaluation as science
    from gda.embedder import load_embedder
    from gda.student import feature_matrix

    if method == "teacher":
        return {q: teacher_rankings[q] for q in query_ids}, None
    train_ids, train_features = feature_matrix(features["image_features"], features["text_features"])
    if method == "random":
        return science.random_rankings(query_ids, train_ids, evaluation.seed), None
    all_query_ids, query_features = feature_matrix(features["query_image_features"], features["query_text_features"])
    embedder = load_embedder(artifacts.path(EMBEDDER))
    queries, train = science.method_vectors(embedder, query_features, train_features)[method]
    rows = {int(q): i for i, q in enumerate(all_query_ids) if int(q) in query_ids}
    return science.cosine_rankings(queries, train, rows, train_ids), embedder.version


def _queries(artifacts: Artifacts, tests: pl.DataFrame):
    """The test queries of `tests` with their exact generated samples and prompt states."""
    from gda.counterfactual import Query
    from gda.queries import load_generated

    out = []
    for (batch,), group in tests.group_by("batch", maintain_order=True):
        generated = load_generated(artifacts.path("generated_queries") / f"{batch}.safetensors")
        position = {q: i for i, q in enumerate(generated.query_ids.tolist())}
        for row in group.iter_rows(named=True):
            i = position[row["query_id"]]
            out.append(
                Query(row["query_id"], row["prompt"], row["seed"], generated.samples[i], generated.prompt_states[i])
            )
    return out


def build_counterfactual_eval(evaluation: EvaluationSettings) -> dg.AssetsDefinition:
    """The asset with one partition per cell of ``evaluation``'s methods x k x query groups."""
    from gda.counterfactual_cells import cells

    keys = [
        cell.key
        for cell in cells(
            evaluation.counterfactual_methods,
            evaluation.counterfactual_k,
            evaluation.counterfactual_queries,
            evaluation.counterfactual_group_size,
        )
    ]

    @dg.asset(
        code_version="1",
        group_name="evaluation",
        partitions_def=dg.StaticPartitionsDefinition(keys),
        ins=every_partition("image_features", "text_features", "query_image_features", "query_text_features"),
        deps=["diffusion_model", EMBEDDER, dg.AssetDep("abu_scores", partition_mapping=dg.AllPartitionMapping())],
        kinds={"pytorch", "duckdb"},
        metadata={
            "dagster/column_schema": column_schema("eval_counterfactual"),
            "dagster/table_name": "eval_counterfactual",
            "partition_expr": "cell",
        },
        check_specs=table_check_specs("eval_counterfactual", asset="counterfactual_eval"),
        pool="gpu",
        description="Counterfactual leave-k-out, one partition per method x k x group of test queries: "
        "retrain the model from scratch (same recipe and seed) without the method's top-k training images and "
        "measure the query's loss change and how its same-seed regeneration moved. Opt-in (counterfactual_job): "
        "each partition costs one full training run per query.",
    )
    def counterfactual_eval(
        context: dg.AssetExecutionContext,
        compute: Compute,
        corpus: CorpusSource,
        warehouse: Warehouse,
        artifacts: Artifacts,
        evaluation: EvaluationSettings,
        image_features: dict[str, IdArray],
        text_features: dict[str, IdArray],
        query_image_features: dict[str, IdArray],
        query_text_features: dict[str, IdArray],
    ):
        from gda import counterfactual as science
        from gda import plots
        from gda.diffusion import ScratchModelConfig
        from gda.diffusion.data import load_corpus_images
        from gda.evaluation import by_level
        from gda.model_card import corpus_fingerprint, read_card

        cell = science.Cell.parse(context.partition_key)
        warehouse.ensure_tables()
        card = read_card(artifacts.path("diffusion_model"))
        if card.kind != "scratch":
            raise dg.Failure(
                "counterfactual_eval retrains the model from scratch, which a registered pretrained model cannot be; "
                "run it on a profile whose diffusion.kind is scratch"
            )
        rows = warehouse.named("corpus_for_training")
        if (
            corpus_fingerprint(rows["id"].to_list(), rows["sha256"].to_list(), rows["captions"].to_list())
            != card.corpus_fingerprint
        ):
            raise dg.Failure(
                "the training images changed since the model was trained; re-materialize diffusion_model first"
            )
        teacher_rankings = _teacher_rankings(warehouse)
        tests = warehouse.named("test_queries").filter(pl.col("query_id").is_in(list(teacher_rankings)))
        query_ids = science.group_queries(
            tests["query_id"].to_list(),
            evaluation.counterfactual_queries,
            evaluation.counterfactual_group_size,
            cell.group,
        )
        tests = tests.filter(pl.col("query_id").is_in(query_ids))
        features = {
            "image_features": image_features,
            "text_features": text_features,
            "query_image_features": query_image_features,
            "query_text_features": query_text_features,
        }
        rankings, embedder_version = _removal_rankings(
            cell.method, query_ids, teacher_rankings, evaluation, artifacts, features
        )
        config = ScratchModelConfig(**card.model_config)
        data = science.TrainingSet(
            rows["id"].to_numpy(),
            load_corpus_images(rows, corpus.shard_path, config.sample_size),
            rows["captions"].to_list(),
        )
        original, _ = open_model(artifacts.path("diffusion_model"), compute.device)
        sampling = {
            row["query_id"]: row
            for row in tests.select("query_id", "steps", "guidance_scale", "guidance_rescale").iter_rows(named=True)
        }
        measured = []
        for query in _queries(artifacts, tests):
            removed = science.top_k(rankings[query.query_id], cell.k)
            retrained, result = science.retrain(config, card.training, data.without(removed), compute.device)
            context.log.info(
                f"query {query.query_id}: retrained without {cell.method}'s top {cell.k} in {result.seconds:.0f} s"
            )
            settings = {
                name: sampling[query.query_id][name] for name in ("steps", "guidance_scale", "guidance_rescale")
            }
            before = science.query_loss(original, query, evaluation.loss_draws, evaluation.loss_seed, card.snr_gamma)
            after = science.query_loss(retrained, query, evaluation.loss_draws, evaluation.loss_seed, card.snr_gamma)
            measured.append(
                {
                    "query_id": query.query_id,
                    "removed_ids": removed.tolist(),
                    "n_train": len(data.ids) - len(removed),
                    "loss_before": before,
                    "loss_after": after,
                    "delta_loss": after - before,
                    "pixel_mse": science.regeneration_mse(retrained, query, settings),
                    "train_seconds": result.seconds,
                }
            )
        frame = tables.conform(
            "eval_counterfactual",
            pl.DataFrame(measured).with_columns(
                cell=pl.lit(cell.key),
                method=pl.lit(cell.method),
                k=pl.lit(cell.k),
                model_version=pl.lit(card.version),
                embedder_version=pl.lit(embedder_version, dtype=pl.String),
            ),
        )
        warehouse.replace_table("eval_counterfactual", frame, ("cell", cell.key))
        so_far = science.summary(warehouse.query("SELECT * FROM eval_counterfactual"))
        chart = plots.grouped_bars_png(
            by_level(so_far, "delta_loss", "k"),
            by_level(so_far, "delta_loss_se", "k"),
            "loss increase of the query after removing each method's top k",
            "ΔL",
        )
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": frame.height,
                "delta_loss": dg.MetadataValue.json(dict(zip(map(str, frame["query_id"]), frame["delta_loss"]))),
                "train_seconds": round(float(frame["train_seconds"].sum()), 1),
                "all_cells_so_far": dg.MetadataValue.md(science.markdown_table(so_far)),
                "chart": png_markdown(chart, "counterfactual ΔL"),
            },
        )
        yield from table_check_results(
            warehouse, "eval_counterfactual", frame.height, Partition("cell", cell.key), asset="counterfactual_eval"
        )

    return counterfactual_eval
