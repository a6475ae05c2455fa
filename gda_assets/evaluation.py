"""Evaluation assets: does the distilled embedder attribute like the teacher? mAP(L) of every method on the
held-out test queries, shown as a table, a bar chart and galleries of the top attributions; and the
counterfactual test of every attribution: retrain without a method's top k and see what the query loses."""

import dagster as dg

from gda import layout
from gda.arrays import IdArray
from gda_assets.checks import (
    Partition,
    column_schema,
    student_guard_result,
    student_guard_spec,
    table_check_results,
    table_check_specs,
)
from gda_assets.metadata import png_markdown
from gda_assets.partitions import every_partition
from resources import (
    Artifacts,
    Compute,
    CorpusSource,
    EvaluationSettings,
    QueryPlan,
    StudentSettings,
    StudySettings,
    TeacherSettings,
    Warehouse,
    home_store,
)

FEATURES = every_partition(
    layout.IMAGE_FEATURES, layout.TEXT_FEATURES, layout.QUERY_IMAGE_FEATURES, layout.QUERY_TEXT_FEATURES
)


@dg.asset(
    code_version="1",
    group_name="evaluation",
    ins={**FEATURES, **every_partition(layout.BASELINE_LOSSES)},
    # The reseeded teacher reads the model, its factors and training side, and the test queries' batches.
    deps=[
        layout.ABU_SCORES,
        layout.ATTRIBUTION_EMBEDDER,
        layout.DIFFUSION_MODEL,
        layout.TRAINING_IMAGES,
        layout.EKFAC_FACTORS,
        layout.TRAINING_GRADIENTS,
        layout.GENERATED_QUERIES,
    ],
    kinds={"pytorch", "duckdb"},
    metadata={"dagster/column_schema": column_schema("eval_rank"), "dagster/table_name": "eval_rank"},
    check_specs=[
        *table_check_specs("eval_rank", asset=layout.RANK_EVAL),
        student_guard_spec(layout.RANK_EVAL),
    ],
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
    baseline_losses: dict[str, IdArray],
):
    from gda import evaluation as science

    warehouse.ensure_tables()
    features = science.Features(image_features, text_features, query_image_features, query_text_features)
    store = home_store(artifacts, warehouse, corpus)
    try:
        result = science.rank_evaluation(
            store, features, teacher.config(), evaluation.config(), baseline_losses, compute.device
        )
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    warehouse.replace_table("eval_rank", result.frame)
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.frame.height,
            "table": dg.MetadataValue.md(result.markdown),
            "chart": png_markdown(result.chart, "mAP(L)"),
            "gallery": png_markdown(result.gallery, "galleries"),
            f"distilled_over_concat_raw_at_{result.middle_level}": result.distilled_over_concat_raw,
            "test_queries": result.test_queries,
            "embedder_version": result.embedder_version,
        },
    )
    yield from table_check_results(warehouse, "eval_rank", result.frame.height, asset=layout.RANK_EVAL)
    yield student_guard_result(result.guard, layout.RANK_EVAL)


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
    every = dg.AllPartitionMapping()

    @dg.asset(
        code_version="1",
        group_name="evaluation",
        partitions_def=dg.StaticPartitionsDefinition(keys),
        ins=FEATURES,
        deps=[
            layout.DIFFUSION_MODEL,
            layout.ATTRIBUTION_EMBEDDER,
            dg.AssetDep(layout.ABU_SCORES, partition_mapping=every),
            dg.AssetDep(layout.TRAINING_IMAGES, partition_mapping=every),
            dg.AssetDep(layout.GENERATED_QUERIES, partition_mapping=every),
        ],
        kinds={"pytorch", "duckdb"},
        metadata={
            "dagster/column_schema": column_schema("eval_counterfactual"),
            "dagster/table_name": "eval_counterfactual",
            "partition_expr": "cell",
        },
        check_specs=table_check_specs("eval_counterfactual", asset=layout.COUNTERFACTUAL_EVAL),
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
        from gda.evaluation import Features

        cell = science.Cell.parse(context.partition_key)
        warehouse.ensure_tables()
        features = Features(image_features, text_features, query_image_features, query_text_features)
        store = home_store(artifacts, warehouse, corpus)
        try:
            frame = science.evaluate_cell(store, features, cell, evaluation.config(), compute.device, context.log.info)
        except ValueError as error:
            raise dg.Failure(str(error)) from error
        warehouse.replace_table("eval_counterfactual", frame, ("cell", cell.key))
        so_far = science.summary(warehouse.query("SELECT * FROM eval_counterfactual"))
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": frame.height,
                "delta_loss": dg.MetadataValue.json(dict(zip(map(str, frame["query_id"]), frame["delta_loss"]))),
                "train_seconds": round(float(frame["train_seconds"].sum()), 1),
                "all_cells_so_far": dg.MetadataValue.md(science.markdown_table(so_far)),
                "chart": png_markdown(science.summary_chart(so_far), "counterfactual ΔL"),
            },
        )
        yield from table_check_results(
            warehouse,
            "eval_counterfactual",
            frame.height,
            Partition("cell", cell.key),
            asset=layout.COUNTERFACTUAL_EVAL,
        )

    return counterfactual_eval


def build_student_study(query_plan: QueryPlan, student: StudentSettings) -> dg.AssetsDefinition:
    """The asset with one partition per arm of the study that ``query_plan`` and ``student`` make."""
    from gda.study_arms import study_arms

    arms = {arm.name: arm for arm in study_arms(query_plan.n_train, student.top_k, student.widths, student.epochs)}

    @dg.asset(
        code_version="1",
        group_name="evaluation",
        partitions_def=dg.StaticPartitionsDefinition(list(arms)),
        ins=FEATURES,
        deps=[
            dg.AssetDep(layout.ABU_SCORES, partition_mapping=dg.AllPartitionMapping()),
            layout.DIFFUSION_MODEL,  # the features-generator arm's UNet activations
        ],
        kinds={"pytorch", "duckdb"},
        metadata={
            "dagster/column_schema": column_schema("student_study"),
            "dagster/table_name": "student_study",
            "partition_expr": "arm",
        },
        check_specs=table_check_specs("student_study", asset=layout.STUDENT_STUDY),
        pool="gpu",
        description="The student design study, one partition per arm (a student setting varied along one axis "
        "from the profile's: training queries, pair budget, features, loss, negatives, subsampling, capacity, "
        "epochs, second stage, oracle): students trained with several seeds from the stored teacher scores, each "
        "measured like rank_eval's distilled row. Opt-in (student_study_job).",
    )
    def student_study(
        context: dg.AssetExecutionContext,
        compute: Compute,
        corpus: CorpusSource,
        warehouse: Warehouse,
        artifacts: Artifacts,
        student: StudentSettings,
        study: StudySettings,
        evaluation: EvaluationSettings,
        image_features: dict[str, IdArray],
        text_features: dict[str, IdArray],
        query_image_features: dict[str, IdArray],
        query_text_features: dict[str, IdArray],
    ):
        from gda import student_study as science
        from gda.evaluation import Features

        warehouse.ensure_tables()
        features = Features(image_features, text_features, query_image_features, query_text_features)
        try:
            arm = arms[context.partition_key]
            store = home_store(artifacts, warehouse, corpus)
            inputs = science.study_inputs(arm, store, features, evaluation.l_fractions, compute.device)
            frame = science.run_arm(arm, student.config(), inputs, study.seeds)
        except ValueError as error:
            raise dg.Failure(str(error)) from error
        warehouse.replace_table("student_study", frame, ("arm", context.partition_key))
        so_far = warehouse.query("SELECT * FROM student_study")
        curve = science.query_curve_png(so_far)
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": frame.height,
                "this_arm": dg.MetadataValue.md(science.markdown_table(frame)),
                "all_arms_so_far": dg.MetadataValue.md(science.markdown_table(so_far)),
                "chart": png_markdown(science.arms_chart_png(so_far), "student study"),
                **({"query_curve": png_markdown(curve, "mAP vs train queries")} if curve else {}),
            },
        )
        yield from table_check_results(
            warehouse,
            "student_study",
            frame.height,
            Partition("arm", context.partition_key),
            asset=layout.STUDENT_STUDY,
        )

    return student_study
