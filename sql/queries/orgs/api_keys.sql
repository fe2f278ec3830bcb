-- name: insert_key
-- A new API key; only its hash is stored.
INSERT INTO api_keys (id, org_id, name, token_hash, prefix)
VALUES (%(id)s, %(org_id)s, %(name)s, %(token_hash)s, %(prefix)s)
RETURNING id, name, prefix, created_at, revoked_at;

-- name: list_keys
-- An organization's keys, newest first.
SELECT id, name, prefix, created_at, revoked_at FROM api_keys
WHERE org_id = %(org_id)s AND (%(include_revoked)s OR revoked_at IS NULL)
ORDER BY created_at DESC, id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_keys
-- How many keys list_keys would page through.
SELECT count(*) FROM api_keys
WHERE org_id = %(org_id)s AND (%(include_revoked)s OR revoked_at IS NULL);

-- name: find_key_org
-- The organization that owns a key.
SELECT org_id FROM api_keys WHERE id = %(key_id)s;

-- name: revoke_key
-- Revoke a key (revoking twice keeps the first time).
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
WHERE id = %(key_id)s
RETURNING id, revoked_at;
