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

-- name: batch_queries
-- The generated queries of one batch, in query order.
SELECT query_id, prompt, image_path FROM generated_queries WHERE batch = ? ORDER BY query_id;

-- name: batch_candidates
-- The DINO candidates of one query batch, nearest first.
SELECT query_id, train_id FROM dino_candidates WHERE batch = ? AND kind = 'candidate' ORDER BY query_id, rank;

-- name: shard_training_items
-- One shard's images with the caption the teacher scores them with.
SELECT id, shard, key, captions FROM training_images WHERE shard = ? ORDER BY id;

-- name: top_attributions
-- The most influential training images of a query by the AbU+ teacher, with their captions and sources.
SELECT s.rank, s.train_id, s.score, t.caption, t.url, t.license
FROM abu_scores s JOIN training_images t ON t.id = s.train_id
WHERE s.query_id = ? ORDER BY s.rank LIMIT ?;
