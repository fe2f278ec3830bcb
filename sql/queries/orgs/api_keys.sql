-- name: insert_key
-- A new admin API key; only its hash is stored.
INSERT INTO api_keys (id, org_id, name, token_hash, prefix)
VALUES (%(id)s, %(org_id)s, %(name)s, %(token_hash)s, %(prefix)s)
RETURNING id, name, prefix, scope, device_group_ids, expires_at, max_devices, devices_registered,
          created_at, revoked_at;

-- name: insert_enroll_key
-- A new enrollment key with its groups, expiry and maximum of devices; only its hash is stored.
INSERT INTO api_keys (id, org_id, name, token_hash, prefix, scope, device_group_ids, expires_at,
                      max_devices)
VALUES (%(id)s, %(org_id)s, %(name)s, %(token_hash)s, %(prefix)s, 'enroll',
        ARRAY(SELECT DISTINCT g FROM unnest(%(device_group_ids)s::text[]) AS g ORDER BY g),
        now() + make_interval(secs => %(expires_in_seconds)s::integer), %(max_devices)s)
RETURNING id, name, prefix, scope, device_group_ids, expires_at, max_devices, devices_registered,
          created_at, revoked_at;

-- name: list_keys
-- An organization's keys, newest first.
SELECT id, name, prefix, scope, device_group_ids, expires_at, max_devices, devices_registered,
       created_at, revoked_at
FROM api_keys
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

-- name: claim_enrollment
-- Count one registration against an enrollment key, atomically: the guarded UPDATE waits for a concurrent one and re-checks max_devices, so the count never passes it; claimed is false (and nothing changes) when the key is revoked, expired or full.
WITH claimed AS (
    UPDATE api_keys SET devices_registered = devices_registered + 1
    WHERE id = %(key_id)s AND scope = 'enroll' AND revoked_at IS NULL
      AND (expires_at IS NULL OR expires_at > now())
      AND (max_devices IS NULL OR devices_registered < max_devices)
    RETURNING id
)
SELECT k.id, EXISTS (SELECT 1 FROM claimed) AS claimed, k.revoked_at IS NOT NULL AS revoked,
       coalesce(k.expires_at <= now(), false) AS expired, k.device_group_ids
FROM api_keys AS k
WHERE k.id = %(key_id)s;
