-- name: insert_shared_model
-- Share a model into a federation; sharing twice changes nothing.
INSERT INTO federation_models (federation_id, model_id)
VALUES (%(federation_id)s, %(model_id)s)
ON CONFLICT (federation_id, model_id) DO NOTHING;

-- name: list_shared_models
-- The models shared into a federation, oldest share first.
SELECT m.id, m.name, m.org_id, m.framework, m.use_case, m.description, s.shared_at
FROM federation_models AS s JOIN models AS m ON m.id = s.model_id
WHERE s.federation_id = %(federation_id)s
ORDER BY s.shared_at, m.id;

-- name: find_member_share
-- Whether a model is shared into a federation the organization is an active member of.
SELECT true FROM federation_models AS s
JOIN federation_members AS m ON m.federation_id = s.federation_id
WHERE s.model_id = %(model_id)s AND m.org_id = %(org_id)s AND m.status = 'active'
LIMIT 1;
