"""``build_defs``: the one place that turns settings (home, profile, shards folder, overrides) into
``Definitions``. ``definitions.py`` calls it with the environment's settings; tests call it directly."""

from pathlib import Path
from typing import Any

import dagster as dg

from gda import layout, tables
from gda.home import Home
from gda.profiles import profile_values
from gda_assets.corpus import build_training_images, demo_corpus, shard_sensor
from gda_assets.deployment import LOCAL, K8sSettings, executor_for
from gda_assets.evaluation import build_counterfactual_eval, build_student_study, rank_eval
from gda_assets.features import image_features, text_features
from gda_assets.jobs import (
    baseline_job,
    counterfactual_job,
    demo_corpus_job,
    embedding_job,
    evaluation_job,
    index_job,
    ingest_job,
    model_job,
    query_batch_job,
    shard_job,
    student_job,
    student_study_job,
    teacher_job,
    teacher_shard_job,
)
from gda_assets.model import build_query_prompts, diffusion_model, generated_queries, query_features
from gda_assets.student import attribution_embedder, attribution_index, attribution_log, training_embeddings
from gda_assets.teacher import abu_scores, baseline_losses, dino_candidates, ekfac_factors, training_gradients
from resources import (
    ArrayIOManager,
    Artifacts,
    Compute,
    CorpusSource,
    DemoCorpusSource,
    DiffusionSource,
    Encoders,
    EvaluationSettings,
    IndexSettings,
    QueryPlan,
    StudentSettings,
    StudySettings,
    TeacherSettings,
    TransactionalDuckDBPolarsIOManager,
    Warehouse,
)

# Who answers for every asset in the UI (an email or "team:NAME"); a deployment passes its own.
OWNER = "team:data-attribution"

# Runs what the automation conditions request (ON_NEW_SHARDS): one backfill per tick, so shards already
# present are absorbed as one backfill rather than a run per partition.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Materializes a new shard's partitions and adds it to the index as soon as the shard sensor "
    "registers it.",
)


def build_resources(home: Home, profile: str, shards: Path | None) -> dict[str, Any]:
    values = profile_values(profile)
    return {
        "compute": Compute(**values["compute"]),
        "encoders": Encoders(**values["encoders"]),
        "corpus": CorpusSource(shards_dir=str(shards or home.shards)),
        "demo_corpus_source": DemoCorpusSource(
            **values["demo_corpus_source"],
            heldout_prompts=str(home.artifacts / layout.DEMO_CORPUS / "heldout_prompts.parquet"),
        ),
        "diffusion": DiffusionSource(**values["diffusion"]),
        "query_plan": QueryPlan(**values["query_plan"]),
        "teacher": TeacherSettings(**values["teacher"]),
        "student": StudentSettings(**values["student"]),
        "study": StudySettings(**values.get("study", {})),
        "index": IndexSettings(**values.get("index", {})),
        "evaluation": EvaluationSettings(**values.get("evaluation", {})),
        "artifacts": Artifacts(root=str(home.artifacts)),
        "warehouse": (warehouse := Warehouse(database=str(home.duckdb_path), **values.get("warehouse", {}))),
        "warehouse_io": TransactionalDuckDBPolarsIOManager(database=str(home.duckdb_path), schema=tables.SCHEMA),
        "batch_tables_io": warehouse.table_io_manager(),  # dino_candidates, abu_scores: DuckDB or Parquet
        "array_io": ArrayIOManager(root=str(home.artifacts)),
    }


def build_defs(
    home: Home | None = None,
    profile: str | None = None,
    shards: Path | None = None,
    overrides: dict[str, Any] | None = None,
    owner: str = OWNER,
    deployment: str | K8sSettings = LOCAL,
) -> dg.Definitions:
    """Definitions for one home. With ``shards`` (a user's img2dataset folder) the embedded corpus is left
    out of the graph and everything downstream runs on the user's shards. ``overrides`` replace resources
    by name; ``owner`` owns every asset. ``deployment`` picks the executor of every job
    (``gda_assets/deployment.py``): ``local`` (Dagster's default) or ``k8s``."""
    home = home or Home.resolve()
    embedded = shards is None
    resources = {**build_resources(home, profile, shards), **(overrides or {})}
    assets: list[Any] = [
        build_training_images(embedded),
        image_features,
        text_features,
        diffusion_model,
        build_query_prompts(embedded),
        generated_queries,
        query_features,
        dino_candidates,
        ekfac_factors,
        training_gradients,
        baseline_losses,
        abu_scores,
        attribution_embedder,
        training_embeddings,
        attribution_index,
        rank_eval,
        build_counterfactual_eval(resources["evaluation"]),
        build_student_study(resources["query_plan"], resources["student"]),
        attribution_log,
    ]
    jobs: list[Any] = [
        shard_job,
        ingest_job,
        model_job,
        query_batch_job,
        teacher_shard_job,
        teacher_job,
        baseline_job,
        student_job,
        embedding_job,
        index_job,
        evaluation_job,
        counterfactual_job,
        student_study_job,
    ]
    if embedded:
        assets.insert(0, demo_corpus)
        jobs.append(demo_corpus_job)
    return dg.Definitions(
        assets=dg.map_asset_specs(lambda spec: spec.replace_attributes(owners=[owner]), assets),
        jobs=jobs,
        sensors=[shard_sensor, automation_sensor],
        resources=resources,
        executor=executor_for(deployment, home, profile, shards, assets),
    )
