-- name: insert_group
-- A new, empty device group.
INSERT INTO device_groups (id, org_id, name, description)
VALUES (%(id)s, %(org_id)s, %(name)s, %(description)s)
RETURNING id, name, description, 0 AS member_count, created_at;

-- name: list_groups
-- An organization's groups with their member counts, newest first.
SELECT g.id, g.name, g.description, g.created_at,
       (SELECT count(*) FROM device_group_members AS m WHERE m.group_id = g.id) AS member_count
FROM device_groups AS g
WHERE g.org_id = %(org_id)s
ORDER BY g.created_at DESC, g.id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_groups
-- How many groups list_groups would page through.
SELECT count(*) FROM device_groups WHERE org_id = %(org_id)s;

-- name: list_group_owners
-- The organization of each group among the ids (unknown ids have no row).
SELECT id, org_id FROM device_groups WHERE id = ANY(%(group_ids)s::text[]);

-- name: insert_members
-- Add devices to a group, skipping those already in it; the row count is how many were added.
INSERT INTO device_group_members (group_id, device_id)
SELECT DISTINCT %(group_id)s::text, d.id FROM unnest(%(device_ids)s::text[]) AS d (id)
ON CONFLICT (group_id, device_id) DO NOTHING;

-- name: count_members
-- How many devices a group holds.
SELECT count(*) FROM device_group_members WHERE group_id = %(group_id)s;
