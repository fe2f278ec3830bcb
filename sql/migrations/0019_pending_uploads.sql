-- uploads.create counts an uploader's pending uploads (neither used nor expired) on every
-- call, to bound the storage one device or one org can reserve (FEDRPC_MAX_PENDING_UPLOADS).
-- coalesce: an org's keys upload with device_id NULL, and `IS NOT DISTINCT FROM` cannot
-- use an index.
CREATE INDEX uploads_pending_idx ON uploads (org_id, (coalesce(device_id, '')))
    WHERE consumed_at IS NULL;
