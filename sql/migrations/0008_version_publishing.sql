-- Draft versions: training.aggregate {publish: false} stores a version only its
-- organization sees and no round may start from, until models.versions.publish.
-- Versions that exist already were public all along, so they stay published.

ALTER TABLE model_versions ADD COLUMN published boolean NOT NULL DEFAULT true;

-- The API's view of a version gains the flag (appended: CREATE OR REPLACE VIEW
-- only adds columns at the end).
CREATE OR REPLACE VIEW model_version_details AS
SELECT v.model_id, v.version, v.parent_version, v.round_id, v.strategy, v.num_updates,
       v.total_samples, v.metrics, v.manifest, v.input_shape, v.description, v.created_at,
       coalesce((SELECT json_agg(json_build_object('kind', a.kind, 'sha256', a.sha256,
                                                   'size_bytes', a.size_bytes) ORDER BY a.kind)
                 FROM model_artifacts AS a
                 WHERE a.model_id = v.model_id AND a.version = v.version), '[]'::json) AS artifacts,
       v.published
FROM model_versions AS v;
