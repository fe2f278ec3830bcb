-- name: delete_stale_uploads
-- Delete upload rows that expired unused, or were used long enough ago, recording their keys to delete; several processes take disjoint rows.
-- (Two scans, each an index range: unused ones by expiry, used ones by use; one scan
-- ordered by expiry walked every upload used within the keep window on every pass.)
WITH unused AS (
    SELECT id FROM uploads
    WHERE consumed_at IS NULL AND expires_at < now() - make_interval(secs => %(grace_seconds)s)
    ORDER BY expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), used AS (
    SELECT id FROM uploads
    WHERE consumed_at < now() - make_interval(secs => %(used_keep_seconds)s)
      AND expires_at < now() - make_interval(secs => %(grace_seconds)s)
    ORDER BY consumed_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM uploads AS u
    WHERE u.id IN (SELECT id FROM unused UNION ALL SELECT id FROM used)
    RETURNING u.object_key
), doomed AS (
    INSERT INTO doomed_objects (object_key, reason)
    SELECT object_key, 'upload' FROM gone
    ON CONFLICT (object_key) DO NOTHING
)
SELECT count(*) FROM gone;

-- name: update_expired_updates_to_tombstones
-- Drop the raw bytes of the updates (and SecAgg+ masked vectors) of rounds that ended before the retention; rows stay as tombstones, their objects are recorded to delete.
WITH due AS (
    SELECT id FROM training_rounds
    WHERE updates_purged_at IS NULL AND state IN ('completed', 'failed', 'cancelled')
      AND finished_at < now() - make_interval(secs => %(retention_seconds)s)
    ORDER BY finished_at, id
    LIMIT %(max_rounds)s
    FOR NO KEY UPDATE SKIP LOCKED
), updates AS (
    SELECT u.id, u.object_key, u.data IS NULL AS in_object
    FROM training_updates AS u JOIN due ON u.round_id = due.id
    WHERE u.purged_at IS NULL
    ORDER BY u.id
    LIMIT %(limit)s
    FOR UPDATE OF u
), purged AS (
    UPDATE training_updates AS u SET data = NULL, purged_at = now()
    FROM updates WHERE u.id = updates.id
    RETURNING u.id
), vectors AS (
    SELECT v.session_id, v.sender, v.object_key
    FROM secagg_vectors AS v
    JOIN secagg_sessions AS s ON s.id = v.session_id
    JOIN due ON s.round_id = due.id
    WHERE v.purged_at IS NULL
    FOR UPDATE OF v
), purged_vectors AS (
    UPDATE secagg_vectors AS v SET data = NULL, purged_at = now()
    FROM vectors WHERE v.session_id = vectors.session_id AND v.sender = vectors.sender
    RETURNING v.sender
), doomed AS (
    INSERT INTO doomed_objects (object_key, reason)
    SELECT object_key, 'update' FROM updates WHERE in_object
    UNION ALL
    SELECT object_key, 'update' FROM vectors WHERE object_key IS NOT NULL
    ON CONFLICT (object_key) DO NOTHING
), finished AS (
    -- A round is done once none of its updates is left (this statement's own are not seen).
    UPDATE training_rounds AS r SET updates_purged_at = now()
    FROM due
    WHERE r.id = due.id AND NOT EXISTS (
        SELECT 1 FROM training_updates AS u
        WHERE u.round_id = due.id AND u.purged_at IS NULL
          AND u.id NOT IN (SELECT id FROM updates))
    RETURNING r.id
)
SELECT (SELECT count(*) FROM purged) AS updates,
       (SELECT count(*) FROM purged_vectors) AS vectors,
       (SELECT count(*) FROM finished) AS rounds;

-- name: claim_sweep
-- Take the orphan sweep for lease_seconds unless another process holds it; where it goes on from.
UPDATE storage_sweep SET leased_until = now() + make_interval(secs => %(lease_seconds)s)
WHERE leased_until IS NULL OR leased_until < now()
RETURNING after, leased_until;

-- name: update_sweep
-- Where the next sweep batch starts ('' starts over), and the lease given back; only by the holder of this lease (leased_until is its token), so a process whose lease ran out cannot reset its successor's.
UPDATE storage_sweep
SET after = %(after)s, leased_until = NULL, rounds = rounds + (%(after)s = '')::int
WHERE leased_until = %(leased_until)s;

-- name: insert_orphans
-- Record the listed objects that no row names and that were last written before the grace period, to delete once it passed again.
-- (LATERAL ... LIMIT 1 keeps the lookup one index probe per branch of the view and key,
-- where a NOT EXISTS would be planned as a hash of every key the rows name.)
INSERT INTO doomed_objects (object_key, reason, not_before)
SELECT listed.key, 'orphan', now() + make_interval(secs => %(grace_seconds)s)
FROM unnest(%(keys)s::text[], %(modified)s::timestamptz[]) AS listed (key, modified)
LEFT JOIN LATERAL (SELECT true AS named FROM stored_object_refs AS r
                   WHERE r.object_key = listed.key LIMIT 1) AS ref ON true
WHERE listed.modified < now() - make_interval(secs => %(grace_seconds)s) AND ref.named IS NULL
ON CONFLICT (object_key) DO NOTHING;

-- name: claim_doomed_objects
-- Lease up to limit due keys to this process; a key some row names again is forgotten instead (never deleted).
WITH picked AS (
    SELECT object_key FROM doomed_objects
    WHERE not_before <= now() AND (claimed_until IS NULL OR claimed_until < now())
    ORDER BY not_before
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), checked AS (
    SELECT picked.object_key, ref.named IS NOT NULL AS named
    FROM picked
    LEFT JOIN LATERAL (SELECT true AS named FROM stored_object_refs AS r
                       WHERE r.object_key = picked.object_key LIMIT 1) AS ref ON true
), forgotten AS (
    DELETE FROM doomed_objects AS d USING checked
    WHERE d.object_key = checked.object_key AND checked.named
)
UPDATE doomed_objects AS d
SET claimed_until = now() + make_interval(secs => %(lease_seconds)s), attempts = d.attempts + 1
FROM checked
WHERE d.object_key = checked.object_key AND NOT checked.named
RETURNING d.object_key;

-- name: delete_doomed_objects
-- Forget keys whose objects are deleted.
DELETE FROM doomed_objects WHERE object_key = ANY(%(keys)s::text[]);


-- name: find_named_keys
-- Which of these keys a row names: a failed call deletes only the others, since its transaction may have committed before the failure reached it.
SELECT listed.key FROM unnest(%(keys)s::text[]) AS listed (key)
JOIN LATERAL (SELECT true AS named FROM stored_object_refs AS r
              WHERE r.object_key = listed.key LIMIT 1) AS ref ON true;

-- name: release_doomed_objects
-- Give back keys this process could not delete (storage unreachable), for the next pass.
UPDATE doomed_objects SET claimed_until = NULL WHERE object_key = ANY(%(keys)s::text[]);
