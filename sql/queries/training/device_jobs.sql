-- name: insert_job
-- A queued job; a federated one only while the device is selected in a round of that model and version in an allowed state.
INSERT INTO device_jobs (id, device_id, job_type, round_id, model_id, base_version)
SELECT %(id)s, %(device_id)s, %(job_type)s, %(round_id)s, %(model_id)s, %(base_version)s
WHERE %(round_id)s::text IS NULL OR EXISTS (
    SELECT 1 FROM training_rounds AS r
    JOIN round_devices AS d ON d.round_id = r.id AND d.device_id = %(device_id)s
    WHERE r.id = %(round_id)s AND r.state = ANY(%(round_states)s::text[])
      AND r.model_id = %(model_id)s AND r.base_version = %(base_version)s)
RETURNING id, device_id, job_type, round_id, model_id, base_version, state, progress, last_error, metrics,
          adapter_key, adapter_sha256, created_at, updated_at, completed_at;

-- name: find_round_for_device
-- Why a federated job could not be opened: the round's state, model and version, and the device's selection.
SELECT r.state, r.model_id, r.base_version,
       EXISTS (SELECT 1 FROM round_devices AS d
               WHERE d.round_id = r.id AND d.device_id = %(device_id)s) AS selected
FROM training_rounds AS r WHERE r.id = %(round_id)s;

-- name: find_job
-- A job's owner, state, model and round, with the state of its round (null for a personalization job).
SELECT j.device_id, j.state, j.model_id, j.round_id, r.state AS round_state
FROM device_jobs AS j LEFT JOIN training_rounds AS r ON r.id = j.round_id
WHERE j.id = %(job_id)s;

-- name: update_job_status
-- Move a job of this device from one of from_states to state, only while its round (if any) is in round_states.
UPDATE device_jobs AS j
SET state = %(state)s, progress = coalesce(%(progress)s, j.progress),
    last_error = coalesce(%(last_error)s, j.last_error), updated_at = now()
WHERE j.id = %(job_id)s AND j.device_id = %(device_id)s AND j.state = ANY(%(from_states)s::text[])
  AND (j.round_id IS NULL OR %(round_states)s::text[] IS NULL OR EXISTS (
       SELECT 1 FROM training_rounds AS r WHERE r.id = j.round_id AND r.state = ANY(%(round_states)s::text[])))
RETURNING j.id, j.device_id, j.job_type, j.round_id, j.model_id, j.base_version, j.state, j.progress,
          j.last_error, j.metrics, j.adapter_key, j.adapter_sha256, j.created_at, j.updated_at, j.completed_at;

-- name: complete_job
-- Finish a job of this device that is in one of from_states, only while its round (if any) is in round_states.
UPDATE device_jobs AS j
SET state = 'completed', metrics = %(metrics)s, adapter_key = %(adapter_key)s,
    adapter_sha256 = %(adapter_sha256)s, completed_at = now(), updated_at = now()
WHERE j.id = %(job_id)s AND j.device_id = %(device_id)s AND j.state = ANY(%(from_states)s::text[])
  AND (j.round_id IS NULL OR EXISTS (
       SELECT 1 FROM training_rounds AS r WHERE r.id = j.round_id AND r.state = ANY(%(round_states)s::text[])))
RETURNING j.id, j.device_id, j.job_type, j.round_id, j.model_id, j.base_version, j.state, j.progress,
          j.last_error, j.metrics, j.adapter_key, j.adapter_sha256, j.created_at, j.updated_at, j.completed_at;

-- name: find_job_object
-- The sha256 of an object the server stored for this device and job: its personalized weights for the model or its update in the round.
SELECT weights_sha256 AS sha256 FROM personalized_states
WHERE device_id = %(device_id)s AND model_id = %(model_id)s AND weights_key = %(object_key)s
UNION ALL
SELECT sha256 FROM training_updates
WHERE device_id = %(device_id)s AND round_id = %(round_id)s AND object_key = %(object_key)s
LIMIT 1;
