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
