-- name: claim_round_for_aggregation
-- running -> aggregating under a fresh claim token and lease, or take over an aggregation whose lease ran out.
UPDATE training_rounds
SET state = 'aggregating', aggregation_claim = %(claim)s, aggregation_started_at = now(),
    aggregation_lease_until = now() + make_interval(secs => %(lease_seconds)s), updated_at = now()
WHERE id = %(round_id)s
  AND (state = 'running' OR (state = 'aggregating' AND aggregation_lease_until < now()))
RETURNING id;

-- name: update_aggregation_lease
-- Extend the lease of the aggregation holding this claim; no row once the round is not its own.
UPDATE training_rounds SET aggregation_lease_until = now() + make_interval(secs => %(lease_seconds)s)
WHERE id = %(round_id)s AND state = 'aggregating' AND aggregation_claim = %(claim)s;

-- name: update_round_running_again
-- aggregating -> running under this claim: the aggregation failed for a reason that may pass (storage down).
UPDATE training_rounds
SET state = 'running', aggregation_claim = NULL, aggregation_lease_until = NULL, aggregation_started_at = NULL,
    updated_at = now()
WHERE id = %(round_id)s AND state = 'aggregating' AND aggregation_claim = %(claim)s;

-- name: update_round_failed
-- aggregating -> failed under this claim, with the reason.
UPDATE training_rounds
SET state = 'failed', failure_reason = %(reason)s, finished_at = now(), aggregation_claim = NULL,
    aggregation_lease_until = NULL, aggregation_started_at = NULL, updated_at = now()
WHERE id = %(round_id)s AND state = 'aggregating' AND aggregation_claim = %(claim)s;

-- name: update_round_completed
-- aggregating -> completed under this claim, pointing at the new version.
UPDATE training_rounds
SET state = 'completed', result_version = %(version)s, finished_at = now(), aggregation_claim = NULL,
    aggregation_lease_until = NULL, aggregation_started_at = NULL, updated_at = now()
WHERE id = %(round_id)s AND state = 'aggregating' AND aggregation_claim = %(claim)s;

-- name: list_round_updates
-- The updates of a round from devices that are not revoked, oldest first, with what aggregation needs.
SELECT u.id, u.device_id, u.object_key, u.sha256, u.sample_count, u.encoding, u.metrics, u.data
FROM training_updates AS u JOIN devices AS d ON d.id = u.device_id
WHERE u.round_id = %(round_id)s AND d.revoked_at IS NULL
ORDER BY u.received_at, u.id;

-- name: list_round_update_heads
-- The same updates without their bytes: enough to check a round's rules before claiming it.
SELECT u.id, u.device_id, u.object_key, u.sha256, u.sample_count, u.encoding, u.metrics
FROM training_updates AS u JOIN devices AS d ON d.id = u.device_id
WHERE u.round_id = %(round_id)s AND d.revoked_at IS NULL
ORDER BY u.received_at, u.id;

-- name: find_base_artifacts
-- The base version's manifest and the keys of its weights, program and ONNX model.
SELECT v.manifest, v.input_shape, w.object_key AS weights_key, p.object_key AS program_key,
       p.sha256 AS program_sha256, o.object_key AS onnx_key
FROM model_versions AS v
JOIN model_artifacts AS w ON w.model_id = v.model_id AND w.version = v.version AND w.kind = 'safetensors'
JOIN model_artifacts AS p ON p.model_id = v.model_id AND p.version = v.version AND p.kind = 'program'
JOIN model_artifacts AS o ON o.model_id = v.model_id AND o.version = v.version AND o.kind = 'onnx'
WHERE v.model_id = %(model_id)s AND v.version = %(version)s;

-- name: find_server_state
-- The server optimiser state of a model's lineage: the one computed with the given version, if any.
SELECT strategy, version, parent_version, object_key, sha256
FROM model_server_state WHERE model_id = %(model_id)s AND version = %(version)s;

-- name: insert_server_state
-- Remember the server optimiser state computed with a new version, for the rounds trained from it.
INSERT INTO model_server_state (model_id, version, parent_version, strategy, object_key, sha256)
VALUES (%(model_id)s, %(version)s, %(parent_version)s, %(strategy)s, %(object_key)s, %(sha256)s);

-- name: claim_rounds_due
-- Lease up to max_rounds due auto rounds to one pass, counting the attempt: round-robin across organizations.
-- A round is due when every selected device has uploaded or its deadline passed, when its back-off time
-- (next_aggregation_at) has come, or when the worker aggregating it vanished (its lease ran out). Each
-- organization's rounds take turns, oldest-due first; a turn goes to the organizations oldest-due first.
-- The pass's lease (next_aggregation_at = now + lease_seconds) keeps another process's pass off the same round.
WITH due AS (
    SELECT r.id, r.org_id,
           coalesce(r.next_aggregation_at,
                    CASE WHEN r.state = 'aggregating' THEN r.aggregation_lease_until
                         WHEN sel.n > 0 AND up.n >= sel.n THEN least(r.deadline_at, up.last_at)
                         ELSE r.deadline_at END) AS due_at
    FROM training_rounds AS r
    CROSS JOIN LATERAL (SELECT count(*) AS n, max(u.received_at) AS last_at
                        FROM training_updates AS u WHERE u.round_id = r.id) AS up
    CROSS JOIN LATERAL (SELECT count(*) AS n FROM round_devices AS d WHERE d.round_id = r.id) AS sel
    WHERE r.auto_aggregate AND r.state IN ('running', 'aggregating')
      AND (r.next_aggregation_at IS NULL OR r.next_aggregation_at <= now())
      AND ((r.state = 'running' AND (r.deadline_at <= now() OR (sel.n > 0 AND up.n >= sel.n)
                                     OR EXISTS (SELECT 1 FROM secagg_sessions AS s WHERE s.round_id = r.id
                                                AND s.stage IN ('completed', 'failed'))))
           OR (r.state = 'aggregating' AND r.aggregation_lease_until < now()))
), chosen AS (
    SELECT id, due_at, row_number() OVER (PARTITION BY org_id ORDER BY due_at, id) AS turn
    FROM due ORDER BY turn, due_at, id LIMIT %(max_rounds)s
), claimed AS (
    UPDATE training_rounds AS r
    SET next_aggregation_at = now() + make_interval(secs => %(lease_seconds)s),
        aggregation_attempts = r.aggregation_attempts + 1
    FROM chosen
    WHERE r.id = chosen.id AND r.state IN ('running', 'aggregating')
      AND (r.next_aggregation_at IS NULL OR r.next_aggregation_at <= now())
    RETURNING r.id, r.org_id, r.aggregation_attempts AS attempts,
              r.secagg_config IS NOT NULL AS secure_aggregation, r.deadline_at <= now() AS past_deadline
)
SELECT claimed.id, claimed.org_id, claimed.attempts, claimed.secure_aggregation, claimed.past_deadline,
       s.stage AS secagg_stage, s.failure_reason AS secagg_failure
FROM claimed JOIN chosen USING (id) LEFT JOIN secagg_sessions AS s ON s.round_id = claimed.id
ORDER BY chosen.turn, chosen.due_at, chosen.id;

-- name: get_round
-- One round, unlocked (the claim above is what serializes aggregations).
SELECT * FROM training_rounds WHERE id = %(round_id)s;

-- name: update_round_given_up
-- Auto-aggregation gives up: running (or aggregating by a vanished worker, its lease run out) -> failed.
UPDATE training_rounds
SET state = 'failed', failure_reason = %(reason)s, last_aggregation_error = %(reason)s, finished_at = now(),
    aggregation_claim = NULL, aggregation_lease_until = NULL, aggregation_started_at = NULL,
    next_aggregation_at = NULL, updated_at = now()
WHERE id = %(round_id)s
  AND (state = 'running' OR (state = 'aggregating' AND aggregation_lease_until < now()));

-- name: update_round_retry_later
-- A running auto round not aggregated this time: take it up again after delay_seconds (or at its
-- deadline when wait_for_deadline), and remember why.
UPDATE training_rounds
SET next_aggregation_at = greatest(now() + make_interval(secs => %(delay_seconds)s),
                                   CASE WHEN %(wait_for_deadline)s THEN deadline_at END),
    last_aggregation_error = %(reason)s
WHERE id = %(round_id)s AND state = 'running';
