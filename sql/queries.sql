-- Named queries used by the CLI, checks and the UI. Each starts with "-- name: NAME".

-- name: ingest_counts
-- Accepted and rejected samples per shard.
SELECT shard,
       (SELECT count(*) FROM training_images t WHERE t.shard = s.shard) AS accepted,
       (SELECT count(*) FROM rejected_images r WHERE r.shard = s.shard) AS rejected
FROM (SELECT shard FROM training_images UNION SELECT shard FROM rejected_images) s
ORDER BY shard;

-- name: rejection_reasons
-- Why samples were rejected, most common first.
SELECT reason, count(*) AS n FROM rejected_images GROUP BY reason ORDER BY n DESC, reason;

-- name: duplicate_ids
-- Training image ids that occur more than once (must be empty).
SELECT id, count(*) AS n FROM training_images GROUP BY id HAVING count(*) > 1;

-- name: shard_images
-- The accepted images of one shard, in tar order: what the feature assets encode.
SELECT id, key, caption FROM training_images WHERE shard = ? ORDER BY id;

-- name: corpus_for_training
-- Every accepted training image with what the model trains on, in id order.
SELECT id, shard, key, captions, sha256 FROM training_images ORDER BY id;

-- name: batch_prompts
-- The prompts of one query batch, in query order.
SELECT query_id, prompt, seed, extra FROM query_prompts WHERE batch = ? ORDER BY query_id;

-- name: batch_splits
-- The split(s) the prompts of one query batch belong to.
SELECT DISTINCT split FROM query_prompts WHERE batch = ? ORDER BY split;

-- name: batch_queries
-- The generated queries of one batch, in query order.
SELECT query_id, prompt, image_path FROM generated_queries WHERE batch = ? ORDER BY query_id;

-- name: batch_candidates
-- The DINO candidates of one query batch, nearest first.
SELECT query_id, train_id FROM dino_candidates WHERE batch = ? AND kind = 'candidate' ORDER BY query_id, rank;

-- name: shard_training_items
-- One shard's images with the caption the teacher scores them with.
SELECT id, shard, key, captions FROM training_images WHERE shard = ? ORDER BY id;

-- name: training_items_by_id
-- Training images by id (any order; callers reorder), with the caption the teacher scores them with.
SELECT id, shard, key, captions FROM training_images WHERE list_contains(?, id);

-- name: student_scores
-- The teacher's rankings of train- and val-split queries: the student's labels and its validation.
SELECT s.query_id, s.train_id, s.rank, s.n_candidates, q.split
FROM abu_scores s JOIN query_prompts q USING (query_id)
WHERE q.split IN ('train', 'val') ORDER BY s.query_id, s.rank;

-- name: study_scores
-- The teacher's rankings of every query with its split: the student study's labels, validation and oracle.
SELECT s.query_id, s.train_id, s.rank, s.n_candidates, q.split
FROM abu_scores s JOIN query_prompts q USING (query_id) ORDER BY s.query_id, s.rank;

-- name: test_rankings
-- The teacher's rankings of the held-out test queries, best first.
SELECT s.query_id, s.train_id, s.rank FROM abu_scores s JOIN query_prompts q USING (query_id)
WHERE q.split = 'test' ORDER BY s.query_id, s.rank;

-- name: test_queries
-- The held-out test queries as generated: prompt, sampling seed and settings, batch and image, in query order.
SELECT g.query_id, g.prompt, g.seed, g.batch, g.image_path, g.steps, g.guidance_scale, g.guidance_rescale
FROM generated_queries g JOIN query_prompts q USING (query_id) WHERE q.split = 'test' ORDER BY g.query_id;

-- name: top_attributions
-- The most influential training images of a query by the AbU+ teacher, with their captions and sources.
SELECT s.rank, s.train_id, s.score, t.caption, t.url, t.license
FROM abu_scores s JOIN training_images t ON t.id = s.train_id
WHERE s.query_id = ? ORDER BY s.rank LIMIT ?;

-- name: serving_metadata
-- What the query service joins onto an answer, and where each training image's bytes are.
SELECT id, shard, key, caption, url, license, image_format FROM training_images ORDER BY id;

-- name: attributions_for_image
-- Every logged answer for one query image, by its sha256 (the answer reports it): the credited training
-- images best first, with their captions and sources. Parameter: image sha256.
SELECT logged_at, interface, prompt, rank, train_id, score, caption, url, license,
       model_version, embedder_version, index_version
FROM attribution_results WHERE image_sha256 = ? ORDER BY logged_at, log_id, rank;

-- name: attributions_for_prompt
-- Every logged answer for one prompt (exact text), as attributions_for_image. Parameter: prompt.
SELECT logged_at, interface, image_sha256, rank, train_id, score, caption, url, license,
       model_version, embedder_version, index_version
FROM attribution_results WHERE prompt = ? ORDER BY logged_at, log_id, rank;

-- name: source_attribution_counts
-- How often each source (url, license) was credited in answers logged in [from, to), most often first.
-- Parameters: from, to (UTC timestamps).
SELECT url, license, count(*) AS attributions, count(DISTINCT log_id) AS answers, min(rank) AS best_rank
FROM attribution_results WHERE logged_at >= ? AND logged_at < ?
GROUP BY url, license ORDER BY attributions DESC, url, license;

-- name: versions_served
-- Which model, embedder and index versions answered queries: how many answers, first and last.
SELECT model_version, embedder_version, index_version, count(*) AS answers,
       min(logged_at) AS first_served, max(logged_at) AS last_served
FROM attribution_log GROUP BY model_version, embedder_version, index_version ORDER BY first_served;
