-- name: claim_key
-- Claim a key for a new call; a stale unfinished claim (a crashed call) is taken over.
INSERT INTO idempotency_keys (scope, method, key, params_hash)
VALUES (%(scope)s, %(method)s, %(key)s, %(params_hash)s)
ON CONFLICT (scope, method, key) DO UPDATE
    SET params_hash = EXCLUDED.params_hash, created_at = now()
    WHERE idempotency_keys.result IS NULL
      AND idempotency_keys.created_at < now() - interval '10 minutes'
RETURNING true AS claimed;

-- name: find_key
-- The stored call behind a key.
SELECT params_hash, result FROM idempotency_keys
WHERE scope = %(scope)s AND method = %(method)s AND key = %(key)s;

-- name: complete_key
-- Record the encoded result of a claimed call.
UPDATE idempotency_keys SET result = %(result)s
WHERE scope = %(scope)s AND method = %(method)s AND key = %(key)s;

-- name: release_key
-- Forget an unfinished claim so the call can be retried with the same key.
DELETE FROM idempotency_keys
WHERE scope = %(scope)s AND method = %(method)s AND key = %(key)s AND result IS NULL;

-- name: delete_expired_keys
-- Forget stored results after the replay window; they can hold tokens shown once.
DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => %(max_age_seconds)s);
