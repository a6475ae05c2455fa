"""Jobs: what the CLI, the sensor and the UI launch."""

import dagster as dg

# Every asset partitioned by shard: ingest plus features, one run per shard.
shard_job = dg.define_asset_job(
    "shard_job",
    selection=dg.AssetSelection.assets("training_images", "rejected_images", "image_features", "text_features"),
    description="Ingest one shard into DuckDB and compute its image and caption features.",
)

ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.assets("training_images", "rejected_images"),
    description="Ingest one shard into DuckDB (accepted and rejected samples) without features.",
)

demo_corpus_job = dg.define_asset_job(
    "demo_corpus_job", selection=dg.AssetSelection.assets("demo_corpus"), description="Render the embedded corpus."
)

model_job = dg.define_asset_job(
    "model_job",
    selection=dg.AssetSelection.assets("diffusion_model", "query_prompts", "ekfac_factors"),
    description="Train (or register) the diffusion model, plan the query prompts, fit the EK-FAC factors.",
)

query_batch_job = dg.define_asset_job(
    "query_batch_job",
    selection=dg.AssetSelection.assets(
        "generated_queries", "query_image_features", "query_text_features", "dino_candidates"
    ),
    description="Generate one batch of queries, compute their features and find their DINO candidates.",
)

teacher_shard_job = dg.define_asset_job(
    "teacher_shard_job",
    selection=dg.AssetSelection.assets("training_gradients"),
    description="Query-independent first-order teacher data of one shard (run after the model).",
)

teacher_job = dg.define_asset_job(
    "teacher_job",
    selection=dg.AssetSelection.assets("abu_scores"),
    description="AbU+ scores of one query batch's candidates.",
)

baseline_job = dg.define_asset_job(
    "baseline_job",
    selection=dg.AssetSelection.assets("baseline_losses"),
    description="L(z, theta0) of one shard on the scoring draws, for the finite teacher mode.",
)

student_job = dg.define_asset_job(
    "student_job",
    selection=dg.AssetSelection.assets("attribution_embedder"),
    description="Distil the teacher's scores into the attribution embedder.",
)

embedding_job = dg.define_asset_job(
    "embedding_job",
    selection=dg.AssetSelection.assets("training_embeddings"),
    description="Embed one shard's training images with the current embedder.",
)

index_job = dg.define_asset_job(
    "index_job",
    selection=dg.AssetSelection.assets("attribution_index"),
    description="Add new shards' embeddings to the FAISS attribution index (or rebuild it for a new embedder).",
)

evaluation_job = dg.define_asset_job(
    "evaluation_job",
    selection=dg.AssetSelection.assets("rank_eval"),
    description="mAP(L) of every method against the teacher on the test queries, with galleries.",
)

counterfactual_job = dg.define_asset_job(
    "counterfactual_job",
    selection=dg.AssetSelection.assets("counterfactual_eval"),
    description="Opt-in: retrain the model without each method's top-k training images (one partition per "
    "method x k x query group) and measure what the test queries lose.",
)
