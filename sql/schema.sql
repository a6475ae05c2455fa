-- The one schema source. Each CREATE TABLE here drives: the table DuckDB holds, the polars schema an
-- asset's output is cast to before it is written, the `dagster/column_schema` metadata in the UI, and the
-- generated not-null checks. Column order is the storage order.

-- One row per accepted training image; partitioned by shard (replaced per shard on re-ingest).
CREATE TABLE IF NOT EXISTS training_images (
    id BIGINT NOT NULL,            -- shard number << 32 | position of the sample in the tar
    shard VARCHAR NOT NULL,        -- partition key: the shard file stem, NNNNN
    key VARCHAR NOT NULL,          -- the sample key inside the shard
    caption VARCHAR NOT NULL,      -- first caption line: what features and the student use
    captions VARCHAR[] NOT NULL,   -- every caption line of the sample
    url VARCHAR,                   -- source URL from KEY.json, when given
    license VARCHAR,               -- license from KEY.json, when given
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    image_format VARCHAR NOT NULL, -- as decoded by Pillow: JPEG, PNG, WEBP
    sha256 VARCHAR NOT NULL,       -- of the image bytes as stored in the shard
    extra VARCHAR                  -- the rest of KEY.json, as JSON text
);

-- One row per sample that could not be used, with the reason; never silently dropped.
CREATE TABLE IF NOT EXISTS rejected_images (
    shard VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    ordinal INTEGER NOT NULL,      -- position of the sample in the tar
    reason VARCHAR NOT NULL,       -- a short code: see gda/corpus/ingest.py REASONS
    detail VARCHAR NOT NULL,       -- one line for a person
    sha256 VARCHAR                 -- of the image bytes, when there were any
);

-- Prompts for generated queries, split into train / val / test and grouped into query batches.
CREATE TABLE IF NOT EXISTS query_prompts (
    query_id BIGINT NOT NULL,      -- unique over all splits
    split VARCHAR NOT NULL,        -- train (student training), val (model selection), test (evaluation)
    batch VARCHAR NOT NULL,        -- query-batch partition key, e.g. test-000
    prompt VARCHAR NOT NULL,
    seed BIGINT NOT NULL,          -- sampling seed of this query
    extra VARCHAR                  -- JSON attributes the prompt was built from (demo: icon, fg, bg, ...)
);

-- One row per generated query image; partitioned by query batch.
CREATE TABLE IF NOT EXISTS generated_queries (
    query_id BIGINT NOT NULL,
    batch VARCHAR NOT NULL,        -- partition key
    prompt VARCHAR NOT NULL,
    seed BIGINT NOT NULL,
    steps INTEGER NOT NULL,        -- DDIM steps
    guidance_scale DOUBLE NOT NULL,
    guidance_rescale DOUBLE NOT NULL,
    model_version VARCHAR NOT NULL, -- the diffusion_model version that generated it
    image_path VARCHAR NOT NULL,   -- PNG under the artifact root
    image_sha256 VARCHAR NOT NULL,
    fg_expected VARCHAR,           -- demo prompts: the colours the prompt asks for ...
    bg_expected VARCHAR,
    fg_detected VARCHAR,           -- ... and the colours the palette detector sees
    bg_detected VARCHAR
);

-- Per query: the K nearest training images by image-feature cosine (the teacher scores only these), and a
-- random sample of other training images kept as negatives for the student. Partitioned by query batch.
CREATE TABLE IF NOT EXISTS dino_candidates (
    query_id BIGINT NOT NULL,
    batch VARCHAR NOT NULL,        -- partition key
    train_id BIGINT NOT NULL,
    rank INTEGER NOT NULL,         -- 0 = nearest; -1 for negatives
    similarity DOUBLE,             -- cosine; null for negatives
    kind VARCHAR NOT NULL          -- candidate | negative
);

-- AbU+ attribution scores: per query, every candidate's tau = L(z, theta') - L(z, theta0) (first-order
-- mode: its linearisation), ranked. Partitioned by query batch.
CREATE TABLE IF NOT EXISTS abu_scores (
    query_id BIGINT NOT NULL,
    batch VARCHAR NOT NULL,        -- partition key
    train_id BIGINT NOT NULL,
    score DOUBLE NOT NULL,         -- tau: higher = more influential
    rank INTEGER NOT NULL,         -- 0 = most influential
    n_candidates INTEGER NOT NULL,
    mode VARCHAR NOT NULL,         -- first_order | finite
    model_version VARCHAR NOT NULL,
    factors_version VARCHAR NOT NULL,
    config_hash VARCHAR NOT NULL   -- of the teacher settings that produced the row
);

-- One row per answer of the query service (gda query, gda serve), appended and never replaced: which
-- training images were credited for which generated image and prompt, by which model, embedder and index.
CREATE TABLE IF NOT EXISTS attribution_log (
    log_id VARCHAR NOT NULL,       -- uuid4 of the answer: a spooled row sent twice is stored once
    logged_at TIMESTAMP NOT NULL,  -- UTC, when the answer was logged
    interface VARCHAR NOT NULL,    -- cli | http
    image_sha256 VARCHAR NOT NULL, -- of the query image's bytes as received (a PIL image: of its PNG encoding)
    prompt VARCHAR NOT NULL,
    top_k INTEGER NOT NULL,        -- results asked for
    model_version VARCHAR NOT NULL, -- the diffusion_model version served (unknown without a model card)
    embedder_version VARCHAR NOT NULL, -- attribution_embedder version
    index_version VARCHAR NOT NULL, -- attribution_index version
    train_ids BIGINT[] NOT NULL,   -- the answer, most influential first (rank 1)
    scores DOUBLE[] NOT NULL,      -- inner products of the embeddings, aligned with train_ids
    latency_ms DOUBLE NOT NULL     -- from the request to the answer, logging excluded
);

-- A view, not a table (no rows of its own): each logged answer unnested into one row per credited training
-- image, with the metadata that image has now (null where it is no longer a training image).
CREATE OR REPLACE VIEW attribution_results AS
SELECT a.log_id, a.logged_at, a.interface, a.image_sha256, a.prompt, a.rank, a.train_id, a.score,
       t.caption, t.url, t.license, a.model_version, a.embedder_version, a.index_version
FROM (
    SELECT log_id, logged_at, interface, image_sha256, prompt, model_version, embedder_version, index_version,
           unnest(range(1, len(train_ids) + 1)) AS rank, unnest(train_ids) AS train_id, unnest(scores) AS score
    FROM attribution_log
) a
LEFT JOIN training_images t ON t.id = a.train_id;

-- Rank evaluation of the held-out test queries: per method and L, the mAP of the method's ranking
-- against the teacher's top L, over the same ranked set as the teacher. Replaced whole by rank_eval.
CREATE TABLE IF NOT EXISTS eval_rank (
    method VARCHAR NOT NULL,       -- random | image | text | concat_raw | distilled | teacher_reseeded
    L INTEGER NOT NULL,            -- positives per query: the teacher's top L
    map DOUBLE NOT NULL,           -- mean over test queries of the average precision
    se DOUBLE NOT NULL,            -- standard error of that mean
    n_queries INTEGER NOT NULL,
    embedder_version VARCHAR NOT NULL
);

-- The student design study: per study arm (one student setting, varied along one axis from the profile's
-- student), seed and L, the mAP of that student against the teacher's top L on the test queries, measured
-- like eval_rank's distilled row. Replaced per arm by student_study.
CREATE TABLE IF NOT EXISTS student_study (
    arm VARCHAR NOT NULL,          -- partition key (gda.study_arms)
    axis VARCHAR NOT NULL,         -- defaults | queries | budget | features | loss | negatives | ...
    seed INTEGER NOT NULL,         -- of the student (initialisation, shuffles, negatives)
    L INTEGER NOT NULL,
    map DOUBLE NOT NULL,           -- mean over test queries of the average precision
    se DOUBLE NOT NULL,            -- standard error of that mean over queries
    n_queries INTEGER NOT NULL,    -- test queries measured
    train_queries INTEGER NOT NULL, -- queries the student learnt from
    pairs BIGINT NOT NULL,         -- training pairs, negatives included
    features VARCHAR NOT NULL,     -- concat | image | text: the input parts the student saw
    normalise_parts BOOLEAN NOT NULL,
    loss VARCHAR NOT NULL,         -- bce | mse | pairwise
    top_k INTEGER NOT NULL,        -- teacher positions learnt per query
    per_query INTEGER,             -- candidates subsampled per query (NULL: all)
    p_negative DOUBLE NOT NULL,
    widths VARCHAR NOT NULL,       -- hidden widths, then the output width, joined by '-'
    epochs INTEGER NOT NULL,
    kept_epoch INTEGER NOT NULL,   -- the epoch whose weights were measured
    oracle BOOLEAN NOT NULL,       -- trained on the test queries' own rankings
    val_map DOUBLE,                -- validation mAP of the kept epoch (NULL without val queries)
    train_seconds DOUBLE NOT NULL,  -- the student's, and the re-ranker's when there is one
    rerank_m INTEGER               -- the cosine top M a second stage re-ordered (NULL: none)
);

-- Counterfactual leave-k-out evaluation: per cell (method, k, query group) and query, the model retrained
-- from scratch without the method's top-k training images, against the model. Replaced per cell by
-- counterfactual_eval.
CREATE TABLE IF NOT EXISTS eval_counterfactual (
    cell VARCHAR NOT NULL,         -- partition key: METHOD-kK-gGROUP
    method VARCHAR NOT NULL,       -- random | concat_raw | distilled | teacher
    k INTEGER NOT NULL,            -- training images removed
    query_id BIGINT NOT NULL,
    removed_ids BIGINT[] NOT NULL, -- the method's top k for the query, best first
    n_train INTEGER NOT NULL,      -- images the retrained model trained on
    loss_before DOUBLE NOT NULL,   -- L(query, theta0) on the fixed draws
    loss_after DOUBLE NOT NULL,    -- L(query, theta-k) on the same draws
    delta_loss DOUBLE NOT NULL,    -- loss_after - loss_before: higher, the removed images mattered more
    pixel_mse DOUBLE NOT NULL,     -- query image vs theta-k's same-seed generation, pixels in [0, 1]
    train_seconds DOUBLE NOT NULL,
    model_version VARCHAR NOT NULL,
    embedder_version VARCHAR       -- of the embedder that ranked (concat_raw and distilled)
);
