"""Jobs: what the CLI, the sensor and the UI launch."""

import dagster as dg

from gda import layout

# Every asset partitioned by shard: ingest plus features, one run per shard.
shard_job = dg.define_asset_job(
    "shard_job",
    selection=dg.AssetSelection.assets(
        layout.TRAINING_IMAGES, layout.REJECTED_IMAGES, layout.IMAGE_FEATURES, layout.TEXT_FEATURES
    ),
    description="Ingest one shard into DuckDB and compute its image and caption features.",
)

ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.assets(layout.TRAINING_IMAGES, layout.REJECTED_IMAGES),
    description="Ingest one shard into DuckDB (accepted and rejected samples) without features.",
)

demo_corpus_job = dg.define_asset_job(
    "demo_corpus_job", selection=dg.AssetSelection.assets(layout.DEMO_CORPUS), description="Render the embedded corpus."
)

model_job = dg.define_asset_job(
    "model_job",
    selection=dg.AssetSelection.assets(layout.DIFFUSION_MODEL, layout.QUERY_PROMPTS, layout.EKFAC_FACTORS),
    description="Train (or register) the diffusion model, plan the query prompts, fit the EK-FAC factors.",
)

query_batch_job = dg.define_asset_job(
    "query_batch_job",
    selection=dg.AssetSelection.assets(
        layout.GENERATED_QUERIES, layout.QUERY_IMAGE_FEATURES, layout.QUERY_TEXT_FEATURES, layout.DINO_CANDIDATES
    ),
    description="Generate one batch of queries, compute their features and find their DINO candidates.",
)

teacher_shard_job = dg.define_asset_job(
    "teacher_shard_job",
    selection=dg.AssetSelection.assets(layout.TRAINING_GRADIENTS),
    description="Query-independent first-order teacher data of one shard (run after the model).",
)

teacher_job = dg.define_asset_job(
    "teacher_job",
    selection=dg.AssetSelection.assets(layout.ABU_SCORES),
    description="AbU+ scores of one query batch's candidates.",
)

baseline_job = dg.define_asset_job(
    "baseline_job",
    selection=dg.AssetSelection.assets(layout.BASELINE_LOSSES),
    description="L(z, theta0) of one shard on the scoring draws, for the finite teacher mode.",
)

student_job = dg.define_asset_job(
    "student_job",
    selection=dg.AssetSelection.assets(layout.ATTRIBUTION_EMBEDDER),
    description="Distil the teacher's scores into the attribution embedder.",
)

embedding_job = dg.define_asset_job(
    "embedding_job",
    selection=dg.AssetSelection.assets(layout.TRAINING_EMBEDDINGS),
    description="Embed one shard's training images with the current embedder.",
)

index_job = dg.define_asset_job(
    "index_job",
    selection=dg.AssetSelection.assets(layout.ATTRIBUTION_INDEX),
    description="Add new shards' embeddings to the FAISS attribution index (or rebuild it for a new embedder).",
)

evaluation_job = dg.define_asset_job(
    "evaluation_job",
    selection=dg.AssetSelection.assets(layout.RANK_EVAL),
    description="mAP(L) of every method against the teacher on the test queries, with galleries.",
)

student_study_job = dg.define_asset_job(
    "student_study_job",
    selection=dg.AssetSelection.assets(layout.STUDENT_STUDY),
    description="Opt-in: train the students of each study arm (one partition per setting) from the stored "
    "teacher scores and measure them on the test queries; the teacher is not re-run.",
)

counterfactual_job = dg.define_asset_job(
    "counterfactual_job",
    selection=dg.AssetSelection.assets(layout.COUNTERFACTUAL_EVAL),
    description="Opt-in: retrain the model without each method's top-k training images (one partition per "
    "method x k x query group) and measure what the test queries lose.",
)
