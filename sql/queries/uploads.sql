-- name: insert_upload
-- Record a presigned upload before its URL is handed out.
INSERT INTO uploads (id, org_id, device_id, object_key, size_bytes, sha256, purpose, expires_at)
VALUES (%(id)s, %(org_id)s, %(device_id)s, %(object_key)s, %(size_bytes)s, %(sha256)s, %(purpose)s,
        now() + make_interval(secs => %(expires_seconds)s))
RETURNING expires_at;

-- name: find_upload
-- One upload with its owner, declared size and digest.
SELECT id, org_id, device_id, object_key, size_bytes, sha256, purpose, expires_at, consumed_at
FROM uploads WHERE id = %(upload_id)s;

-- name: claim_upload
-- Mark an upload as being used; only one caller can win.
UPDATE uploads SET consumed_at = now()
WHERE id = %(upload_id)s AND consumed_at IS NULL AND expires_at > now();

-- name: release_upload
-- Give an upload back after the call that claimed it failed.
UPDATE uploads SET consumed_at = NULL WHERE id = %(upload_id)s;

-- name: lock_uploader
-- Serialize uploads.create of one uploader for the rest of the transaction, so the count
-- of its pending uploads and the insert that follows cannot interleave with another call's.
SELECT pg_advisory_xact_lock(hashtextextended(%(uploader)s, 0));

-- name: count_pending_uploads
-- Uploads of one uploader (a device, or an org's keys when device_id is NULL) neither used nor expired.
SELECT count(*) FROM uploads
WHERE org_id = %(org_id)s AND coalesce(device_id, '') = coalesce(%(device_id)s, '')
  AND consumed_at IS NULL AND expires_at > now();
