-- name: find_reporting_device
-- What the server attaches to a device's observations: its platform and its device groups now.
SELECT d.platform,
       coalesce(array_agg(g.group_id ORDER BY g.group_id) FILTER (WHERE g.group_id IS NOT NULL),
                '{}') AS group_ids
FROM devices AS d
LEFT JOIN device_group_members AS g ON g.device_id = d.id
WHERE d.id = %(device_id)s
GROUP BY d.platform;

-- name: list_declared_variables
-- The variable declarations of the federations an organization is an active member of (those that declare any).
SELECT f.id AS federation_id, f.analytics_variables AS variables
FROM federations AS f
JOIN federation_members AS m ON m.federation_id = f.id AND m.org_id = %(org_id)s AND m.status = 'active'
WHERE f.analytics_variables IS NOT NULL
ORDER BY f.id;

-- name: upsert_variable_kinds
-- Fix the kind of variables an organization reports for the first time (an existing kind stays).
INSERT INTO analytics_variables (org_id, name, kind)
SELECT %(org_id)s, x.name, x.kind
FROM unnest(%(names)s::text[], %(kinds)s::text[]) AS x (name, kind)
ON CONFLICT (org_id, name) DO NOTHING;

-- name: list_variable_kinds
-- The kinds an organization's variables have, for some names.
SELECT name, kind FROM analytics_variables
WHERE org_id = %(org_id)s AND name = ANY (%(names)s::text[]);

-- name: insert_observations
-- Store a checked batch of one device's observations.
INSERT INTO analytics_observations (device_id, org_id, platform, group_ids, variable, value, category, recorded_at)
SELECT %(device_id)s, %(org_id)s, %(platform)s, %(group_ids)s::text[], x.variable, x.value, x.category, x.recorded_at
FROM unnest(%(variables)s::text[], %(values)s::float8[], %(categories)s::text[], %(recorded_at)s::timestamptz[])
     AS x (variable, value, category, recorded_at);
