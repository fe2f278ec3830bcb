-- name: lock_state
-- Serialize writers of one (device, model, federation) state until the transaction ends, even before its row exists.
SELECT pg_advisory_xact_lock(hashtextextended(
    'personalized:' || %(device_id)s || ':' || %(model_id)s || ':' || %(federation_id)s, 0));

-- name: find_state
-- One personalized state; federation_id '' means none.
SELECT device_id, model_id, NULLIF(federation_id, '') AS federation_id, personalization_type, weights_key,
       weights_sha256, weights_size_bytes, metrics, head_layers, round_number, created_at, updated_at
FROM personalized_states
WHERE device_id = %(device_id)s AND model_id = %(model_id)s AND federation_id = %(federation_id)s;

-- name: upsert_state
-- Create or replace a personalized state as a whole.
INSERT INTO personalized_states (device_id, model_id, federation_id, personalization_type, weights_key,
                                 weights_sha256, weights_size_bytes, metrics, head_layers, round_number)
VALUES (%(device_id)s, %(model_id)s, %(federation_id)s, %(personalization_type)s, %(weights_key)s,
        %(weights_sha256)s, %(weights_size_bytes)s, %(metrics)s, %(head_layers)s, %(round_number)s)
ON CONFLICT (device_id, model_id, federation_id) DO UPDATE
SET personalization_type = EXCLUDED.personalization_type, weights_key = EXCLUDED.weights_key,
    weights_sha256 = EXCLUDED.weights_sha256, weights_size_bytes = EXCLUDED.weights_size_bytes,
    metrics = EXCLUDED.metrics, head_layers = EXCLUDED.head_layers, round_number = EXCLUDED.round_number,
    updated_at = now()
RETURNING device_id, model_id, NULLIF(federation_id, '') AS federation_id, personalization_type, weights_key,
          weights_sha256, weights_size_bytes, metrics, head_layers, round_number, created_at, updated_at;

-- name: list_states
-- The latest state per device of one organization's devices, in a federation or (federation_id '') in none.
SELECT latest.device_id, latest.model_id, latest.federation_id, latest.personalization_type, latest.weights_key,
       latest.weights_sha256, latest.weights_size_bytes, latest.metrics, latest.head_layers, latest.round_number,
       latest.created_at, latest.updated_at
FROM (
    SELECT DISTINCT ON (s.device_id)
           s.device_id, s.model_id, NULLIF(s.federation_id, '') AS federation_id, s.personalization_type,
           s.weights_key, s.weights_sha256, s.weights_size_bytes, s.metrics, s.head_layers, s.round_number,
           s.created_at, s.updated_at
    FROM personalized_states AS s
    JOIN devices AS d ON d.id = s.device_id AND d.org_id = %(org_id)s
    WHERE s.federation_id = %(federation_id)s
      AND (%(model_id)s::text IS NULL OR s.model_id = %(model_id)s)
    ORDER BY s.device_id, s.updated_at DESC, s.model_id
) AS latest
ORDER BY latest.updated_at DESC, latest.device_id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_states
-- How many devices list_states pages through.
SELECT count(DISTINCT s.device_id) FROM personalized_states AS s
JOIN devices AS d ON d.id = s.device_id AND d.org_id = %(org_id)s
WHERE s.federation_id = %(federation_id)s
  AND (%(model_id)s::text IS NULL OR s.model_id = %(model_id)s);

-- name: list_participation
-- Per organization: how many of its devices hold a state in the federation (for the model, if given); with no federation, the caller's own only. Counts only.
SELECT d.org_id, count(DISTINCT s.device_id) AS devices
FROM personalized_states AS s
JOIN devices AS d ON d.id = s.device_id
WHERE s.federation_id = %(federation_id)s AND (%(federation_id)s <> '' OR d.org_id = %(org_id)s)
  AND (%(model_id)s::text IS NULL OR s.model_id = %(model_id)s)
GROUP BY d.org_id
ORDER BY d.org_id;
