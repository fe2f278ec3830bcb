-- name: claim_round_for_aggregation
-- running -> aggregating, or take over an aggregation whose worker vanished (lease expired).
UPDATE training_rounds
SET state = 'aggregating', aggregation_started_at = now(), updated_at = now()
WHERE id = %(round_id)s
  AND (state = 'running'
       OR (state = 'aggregating' AND aggregation_started_at < now() - make_interval(secs => %(lease_seconds)s)))
RETURNING id;

-- name: update_round_running_again
-- aggregating -> running: the aggregation failed for a reason that may pass (storage down).
UPDATE training_rounds SET state = 'running', aggregation_started_at = NULL, updated_at = now()
WHERE id = %(round_id)s AND state = 'aggregating';

-- name: update_round_failed
-- aggregating/running -> failed, with the reason.
UPDATE training_rounds
SET state = 'failed', failure_reason = %(reason)s, finished_at = now(), aggregation_started_at = NULL,
    updated_at = now()
WHERE id = %(round_id)s AND state IN ('aggregating', 'running');

-- name: update_round_completed
-- aggregating -> completed, pointing at the new version.
UPDATE training_rounds
SET state = 'completed', result_version = %(version)s, finished_at = now(), aggregation_started_at = NULL,
    updated_at = now()
WHERE id = %(round_id)s AND state = 'aggregating';

-- name: list_round_updates
-- The updates of a round, oldest first, with what aggregation needs.
SELECT id, device_id, object_key, sha256, sample_count, encoding, metrics
FROM training_updates WHERE round_id = %(round_id)s ORDER BY received_at, id;

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
-- The model's server optimiser state, if any.
SELECT strategy, version, object_key, sha256 FROM model_server_state WHERE model_id = %(model_id)s;

-- name: upsert_server_state
-- Remember the server optimiser state for the model's next round.
INSERT INTO model_server_state (model_id, strategy, version, object_key, sha256)
VALUES (%(model_id)s, %(strategy)s, %(version)s, %(object_key)s, %(sha256)s)
ON CONFLICT (model_id) DO UPDATE
SET strategy = EXCLUDED.strategy, version = EXCLUDED.version, object_key = EXCLUDED.object_key,
    sha256 = EXCLUDED.sha256, updated_at = now();

-- name: list_rounds_due
-- Rounds that aggregate by themselves and are ready: every selected device has uploaded,
-- or the deadline has passed; plus aggregations whose lease expired.
SELECT r.id FROM training_rounds AS r
WHERE r.auto_aggregate AND (
    (r.state = 'running' AND (
        r.deadline_at <= now()
        OR (SELECT count(*) FROM training_updates AS u WHERE u.round_id = r.id)
           >= (SELECT count(*) FROM round_devices AS d WHERE d.round_id = r.id)
           AND EXISTS (SELECT 1 FROM round_devices AS d WHERE d.round_id = r.id)))
    OR (r.state = 'aggregating' AND r.aggregation_started_at < now() - make_interval(secs => %(lease_seconds)s)))
ORDER BY r.deadline_at
LIMIT 10;

-- name: get_round
-- One round, unlocked (the claim above is what serializes aggregations).
SELECT * FROM training_rounds WHERE id = %(round_id)s;

-- name: count_round_devices
-- How many devices were selected (the numerator of the sampling rate).
SELECT count(*) FROM round_devices WHERE round_id = %(round_id)s;

-- name: get_federation_budget
-- The budget a DP round is charged against.
SELECT total_epsilon_budget, total_delta_budget FROM federations WHERE id = %(federation_id)s;

-- name: update_round_failed_if_expired
-- running -> failed once its deadline has passed (too few updates arrived in time).
UPDATE training_rounds
SET state = 'failed', failure_reason = %(reason)s, finished_at = now(), updated_at = now()
WHERE id = %(round_id)s AND state = 'running' AND deadline_at <= now();
