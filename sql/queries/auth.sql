-- name: find_org_key_principal
-- The principal behind an API key that is neither revoked nor expired: 'org' for an admin key, 'enroll' for an enrollment key.
SELECT CASE k.scope WHEN 'enroll' THEN 'enroll' ELSE 'org' END AS kind, k.org_id,
       k.id AS key_id, NULL AS device_id
FROM api_keys AS k
WHERE k.token_hash = %(token_hash)s AND k.revoked_at IS NULL
  AND (k.expires_at IS NULL OR k.expires_at > now());

-- name: find_device_principal
-- The device principal behind a device token; a revoked device has no principal.
SELECT 'device' AS kind, d.org_id, NULL AS key_id, d.id AS device_id, d.token_hash
FROM devices AS d
WHERE d.token_hash = %(token_hash)s AND d.revoked_at IS NULL;
