-- name: get_org
-- One organization by id.
SELECT id, name, created_at FROM orgs WHERE id = %(org_id)s;

-- name: insert_org
-- A new organization.
INSERT INTO orgs (id, name) VALUES (%(id)s, %(name)s)
RETURNING id, name, created_at;

-- name: count_orgs
-- How many organizations exist (the first `make run` creates one).
SELECT count(*) FROM orgs;
