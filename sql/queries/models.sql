-- name: insert_model
-- A new model of an organization.
INSERT INTO models (id, org_id, name, framework, use_case, description)
VALUES (%(id)s, %(org_id)s, %(name)s, %(framework)s, %(use_case)s, %(description)s)
RETURNING id, org_id, name, framework, use_case, description, created_at, NULL::integer AS latest_version;

-- name: find_model
-- One model with the latest version its reader may see (drafts only for the owning org).
SELECT m.id, m.org_id, m.name, m.framework, m.use_case, m.description, m.created_at,
       (SELECT max(v.version) FROM model_versions AS v
        WHERE v.model_id = m.id AND (v.published OR m.org_id = %(reader_org_id)s)) AS latest_version
FROM models AS m WHERE m.id = %(model_id)s;

-- name: list_models
-- An organization's models, newest first, optionally by exact name.
SELECT m.id, m.org_id, m.name, m.framework, m.use_case, m.description, m.created_at,
       (SELECT max(v.version) FROM model_versions AS v WHERE v.model_id = m.id) AS latest_version
FROM models AS m
WHERE m.org_id = %(org_id)s AND (%(name)s::text IS NULL OR m.name = %(name)s)
ORDER BY m.created_at DESC, m.id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_models
-- How many models list_models pages through.
SELECT count(*) FROM models
WHERE org_id = %(org_id)s AND (%(name)s::text IS NULL OR name = %(name)s);
