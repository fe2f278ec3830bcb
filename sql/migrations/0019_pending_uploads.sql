-- uploads.create counts an uploader's pending uploads (neither used nor expired) on every
-- call, to bound the storage one device or one org can reserve (FEDRPC_MAX_PENDING_UPLOADS).
-- coalesce: an org's keys upload with device_id NULL, and `IS NOT DISTINCT FROM` cannot
-- use an index.
CREATE INDEX uploads_pending_idx ON uploads (org_id, (coalesce(device_id, '')))
    WHERE consumed_at IS NULL;

-- The storage collector's two scans of stale upload rows (sql/queries/storage_gc.sql,
-- delete_stale_uploads): unused ones by expiry, used ones by the time of use.
CREATE INDEX uploads_unused_expiry_idx ON uploads (expires_at) WHERE consumed_at IS NULL;
CREATE INDEX uploads_used_idx ON uploads (consumed_at) WHERE consumed_at IS NOT NULL;
