-- name: claim_key
-- Claim a key for a new call; a stale unfinished claim (a crashed call) is taken over.
INSERT INTO idempotency_keys (scope, method, key_hash, params_hash, claim)
VALUES (%(scope)s, %(method)s, %(key_hash)s, %(params_hash)s, %(claim)s)
ON CONFLICT (scope, method, key_hash) DO UPDATE
    SET params_hash = EXCLUDED.params_hash, claim = EXCLUDED.claim, created_at = now()
    WHERE idempotency_keys.sealed_result IS NULL
      AND idempotency_keys.created_at < now() - interval '10 minutes'
RETURNING true AS claimed;

-- name: find_key
-- The stored call behind a key.
SELECT params_hash, sealed_result FROM idempotency_keys
WHERE scope = %(scope)s AND method = %(method)s AND key_hash = %(key_hash)s;

-- name: complete_key
-- Record the sealed result of a call, only while that call still owns the claim.
UPDATE idempotency_keys SET sealed_result = %(sealed_result)s
WHERE scope = %(scope)s AND method = %(method)s AND key_hash = %(key_hash)s
  AND claim = %(claim)s AND sealed_result IS NULL;

-- name: release_key
-- Forget an unfinished claim so the call can be retried with the same key; only its
-- owner may.
DELETE FROM idempotency_keys
WHERE scope = %(scope)s AND method = %(method)s AND key_hash = %(key_hash)s
  AND claim = %(claim)s AND sealed_result IS NULL;

-- name: delete_expired_keys
-- Forget stored results after the replay window.
DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => %(max_age_seconds)s);
