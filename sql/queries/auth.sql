-- name: find_org_key_principal
-- The org principal behind an API key that is not revoked.
SELECT 'org' AS kind, k.org_id, k.id AS key_id, NULL AS device_id
FROM api_keys AS k
WHERE k.token_hash = %(token_hash)s AND k.revoked_at IS NULL;

-- name: find_device_principal
-- The device principal behind a device token; a revoked device has no principal.
SELECT 'device' AS kind, d.org_id, NULL AS key_id, d.id AS device_id
FROM devices AS d
WHERE d.token_hash = %(token_hash)s AND d.revoked_at IS NULL;
