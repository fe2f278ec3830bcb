-- name: lock_next_version
-- Lock the model row (one version is numbered at a time) and return the next number.
WITH locked AS (SELECT id FROM models WHERE id = %(model_id)s FOR UPDATE)
SELECT coalesce(max(v.version), 0) + 1 AS next_version
FROM locked LEFT JOIN model_versions AS v ON v.model_id = locked.id;

-- name: insert_version
-- A new version row (published, or a draft); its artifacts follow in the same transaction.
INSERT INTO model_versions (model_id, version, parent_version, round_id, strategy, num_updates,
                            total_samples, metrics, manifest, input_shape, description, published)
VALUES (%(model_id)s, %(version)s, %(parent_version)s, %(round_id)s, %(strategy)s, %(num_updates)s,
        %(total_samples)s, %(metrics)s, %(manifest)s, %(input_shape)s, %(description)s,
        %(published)s);

-- name: insert_artifact
-- One stored object of a version.
INSERT INTO model_artifacts (model_id, version, kind, object_key, sha256, size_bytes)
VALUES (%(model_id)s, %(version)s, %(kind)s, %(object_key)s, %(sha256)s, %(size_bytes)s);

-- name: get_version
-- One version a reader may see (drafts only with_drafts; the latest visible when version is null).
SELECT v.model_id, v.version, v.parent_version, v.round_id, v.strategy, v.num_updates,
       v.total_samples, v.metrics, v.manifest, v.input_shape, v.description, v.created_at,
       v.artifacts, v.published
FROM model_version_details AS v
WHERE v.model_id = %(model_id)s
  AND (v.published OR %(with_drafts)s)
  AND v.version = coalesce(%(version)s::integer,
                           (SELECT max(version) FROM model_versions
                            WHERE model_id = %(model_id)s AND (published OR %(with_drafts)s)));

-- name: list_versions
-- A model's versions a reader may see (drafts only with_drafts), newest first.
SELECT v.model_id, v.version, v.parent_version, v.round_id, v.strategy, v.num_updates,
       v.total_samples, v.metrics, v.manifest, v.input_shape, v.description, v.created_at,
       v.artifacts, v.published
FROM model_version_details AS v
WHERE v.model_id = %(model_id)s AND (v.published OR %(with_drafts)s)
ORDER BY v.version DESC
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_versions
-- How many versions of a model a reader may see (drafts only with_drafts).
SELECT count(*) FROM model_versions
WHERE model_id = %(model_id)s AND (published OR %(with_drafts)s);

-- name: update_version_published
-- Publish a version (publishing twice changes nothing); no row when there is no such version.
UPDATE model_versions SET published = true
WHERE model_id = %(model_id)s AND version = %(version)s
RETURNING version;

-- name: list_artifact_objects
-- Where a version's artifacts are stored, for presigned downloads.
SELECT kind, object_key, sha256, size_bytes FROM model_artifacts
WHERE model_id = %(model_id)s AND version = %(version)s
ORDER BY kind;
