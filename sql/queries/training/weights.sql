-- name: find_upload_target
-- A round as one device about to upload sees it: window (database clock), selection, membership, base manifest and weights, claim bounds.
SELECT r.id, r.model_id, r.base_version, r.state, r.update_format, r.deadline_at,
       r.max_sample_count, r.max_update_norm, a.object_key AS base_weights_key,
       (r.state = 'running' AND now() < r.deadline_at) AS open,
       EXISTS (SELECT 1 FROM round_devices AS d
               WHERE d.round_id = r.id AND d.device_id = %(device_id)s) AS selected,
       EXISTS (SELECT 1 FROM devices AS x
               WHERE x.id = %(device_id)s AND x.revoked_at IS NOT NULL) AS revoked,
       CASE WHEN r.federation_id IS NULL THEN r.org_id = %(org_id)s
            ELSE EXISTS (SELECT 1 FROM federation_members AS m
                         WHERE m.federation_id = r.federation_id AND m.org_id = %(org_id)s
                           AND m.status = 'active') END AS member,
       v.manifest
FROM training_rounds AS r
JOIN model_versions AS v ON v.model_id = r.model_id AND v.version = r.base_version
LEFT JOIN model_artifacts AS a
  ON a.model_id = r.model_id AND a.version = r.base_version AND a.kind = 'safetensors'
WHERE r.id = %(round_id)s;

-- name: insert_update
-- Record an accepted update only while the round is open to the device; FOR SHARE makes a concurrent state change wait for it.
WITH open_round AS (
    SELECT r.id, r.model_id, r.base_version, r.update_format FROM training_rounds AS r
    WHERE r.id = %(round_id)s AND r.state = 'running' AND now() < r.deadline_at
      AND EXISTS (SELECT 1 FROM round_devices AS d WHERE d.round_id = r.id AND d.device_id = %(device_id)s)
      -- A revoked device still cached as authenticated by another process stores nothing.
      AND EXISTS (SELECT 1 FROM devices AS x WHERE x.id = %(device_id)s AND x.revoked_at IS NULL)
    FOR SHARE
)
INSERT INTO training_updates (id, round_id, device_id, org_id, model_id, version, sample_count, update_format,
                              encoding, object_key, sha256, size_bytes, metrics, loss, accuracy, data)
SELECT %(id)s, o.id, %(device_id)s, %(org_id)s, o.model_id, o.base_version, %(sample_count)s, o.update_format,
       %(encoding)s, %(object_key)s, %(sha256)s, %(size_bytes)s, %(metrics)s, %(loss)s, %(accuracy)s, %(data)s
FROM open_round AS o
RETURNING id, round_id, device_id, org_id, model_id, version, sample_count, update_format, encoding, sha256,
          size_bytes, metrics, loss, accuracy, received_at;
