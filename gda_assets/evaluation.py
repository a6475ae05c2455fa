"""Evaluation assets: does the distilled embedder attribute like the teacher? mAP(L) of every method on the
held-out test queries, shown as a table, a bar chart and galleries of the top attributions."""

import dagster as dg
import numpy as np
import polars as pl

from gda import tables
from gda.arrays import IdArray
from gda_assets.checks import column_schema, table_check_results, table_check_specs
from gda_assets.metadata import png_markdown
from gda_assets.model import load_bundle
from gda_assets.partitions import every_partition, shard_partitions
from gda_assets.student import EMBEDDER
from gda_assets.teacher import RESEED_OFFSET, build_teacher, training_rows
from resources import Artifacts, Compute, CorpusSource, EvaluationSettings, TeacherSettings, Warehouse


def _reseeded_rankings(context, compute, corpus, warehouse, artifacts, teacher, teacher_rankings) -> dict[int, np.ndarray]:
    """The teacher's rankings of the same sets with other query draws: the ceiling for any student."""
    import torch

    from gda import teacher as science
    from gda.queries import load_generated
    from gda.unlearning import rank_scores

    bundle, _ = load_bundle(artifacts, compute.device)
    shards = sorted(context.instance.get_dynamic_partitions(shard_partitions.name))
    model = build_teacher(bundle, corpus, warehouse, artifacts, teacher, shards)
    batches = warehouse.query("SELECT DISTINCT batch FROM query_prompts WHERE split = 'test' ORDER BY batch")["batch"]
    out = {}
    for batch_key in batches:
        generated = load_generated(artifacts.path("generated_queries") / f"{batch_key}.safetensors")
        ids = [q for q in generated.query_ids.tolist() if q in teacher_rankings]
        sets = {q: sorted(teacher_rankings[q].tolist()) for q in ids}
        every = science.QueryBatch(
            generated.query_ids.tolist(), generated.samples, generated.prompt_states,
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
                pictures |= dict(zip(group["id"], load_images(corpus.shard_path(shard), group["key"].to_list()), strict=True))
            images.append(generated)
            labels.append(f"query {query_id}: {prompt}")
            for rank, (train_id, captions) in enumerate(zip(rows["id"], rows["captions"], strict=True), start=1):
                images.append(np.asarray(pictures[train_id].convert("RGB")))
                labels.append(f"{name} #{rank}: {captions[0]}")
    return plots.image_grid_png(images, labels, columns=top_k + 1, title="top attributions: teacher (AbU+) vs distilled")


@dg.asset(
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
    stored = warehouse.named("test_rankings")
    if stored.is_empty():
        raise dg.Failure("no teacher scores for test queries; materialize abu_scores for the test batches")
    teacher_rankings = {q: g["train_id"].to_numpy() for (q,), g in stored.group_by("query_id", maintain_order=True)}
    train_ids, train_features = feature_matrix(image_features, text_features)
    query_ids, query_features = feature_matrix(query_image_features, query_text_features)
    embedder = load_embedder(artifacts.path(EMBEDDER))
    rows = {int(q): i for i, q in enumerate(query_ids) if int(q) in teacher_rankings}
    rankings = {"random": science.random_rankings(list(teacher_rankings), train_ids, evaluation.seed)}
    for method, (queries, train) in science.method_vectors(embedder, query_features, train_features).items():
        rankings[method] = science.cosine_rankings(queries, train, rows, train_ids)
    rankings["teacher_reseeded"] = _reseeded_rankings(context, compute, corpus, warehouse, artifacts, teacher, teacher_rankings)
    rankings = {method: science.restrict(ranking, teacher_rankings) for method, ranking in rankings.items()}
    levels = science.levels_for(len(train_ids), evaluation.l_fractions)
    table = science.rank_table(teacher_rankings, rankings, levels).with_columns(embedder_version=pl.lit(embedder.version))
    frame = tables.conform("eval_rank", table)

    chart = plots.grouped_bars_png(science.by_level(table, "map"), science.by_level(table, "se"), "mAP(L) against the teacher", "mAP")
    shown = warehouse.query(
        "SELECT g.query_id, g.prompt, g.image_path FROM generated_queries g JOIN query_prompts q USING (query_id) "
        "WHERE q.split = 'test' ORDER BY g.query_id LIMIT ?",
        [evaluation.gallery_queries],
    )
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
                _gallery(warehouse, corpus, artifacts, teacher_rankings, rankings["distilled"], shown, evaluation.gallery_top_k),
                "galleries",
            ),
            f"distilled_over_concat_raw_at_{middle}": distilled / raw if raw > 0 else float("nan"),
            "test_queries": len(teacher_rankings),
            "embedder_version": embedder.version,
        },
    )
    yield from table_check_results(warehouse, "eval_rank", frame.height, asset="rank_eval")
