-- name: insert_federation
-- A new federation with its (optional) budget.
INSERT INTO federations (id, name, description, owner_org_id, total_epsilon_budget, total_delta_budget,
                         min_round_updates, analytics_min_group_size, analytics_allow_min_max,
                         analytics_variables)
VALUES (%(id)s, %(name)s, %(description)s, %(owner_org_id)s, %(total_epsilon_budget)s, %(total_delta_budget)s,
        %(min_round_updates)s, %(analytics_min_group_size)s, %(analytics_allow_min_max)s,
        %(analytics_variables)s)
RETURNING id, name, description, owner_org_id, total_epsilon_budget, total_delta_budget, min_round_updates,
          jsonb_build_object('min_group_size', analytics_min_group_size,
                             'allow_min_max', analytics_allow_min_max,
                             'variables', analytics_variables) AS analytics_policy,
          created_at, updated_at;

-- name: insert_owner_membership
-- The owner is the federation's first active member.
INSERT INTO federation_members (id, federation_id, org_id, status, joined_at)
VALUES (%(id)s, %(federation_id)s, %(org_id)s, 'active', now());

-- name: find_federation_role
-- A federation and the role of one organization in it: owner, active, invited or none.
SELECT f.id, f.name, f.description, f.owner_org_id, f.total_epsilon_budget, f.total_delta_budget,
       f.min_round_updates,
       jsonb_build_object('min_group_size', f.analytics_min_group_size,
                          'allow_min_max', f.analytics_allow_min_max,
                          'variables', f.analytics_variables) AS analytics_policy,
       f.created_at, f.updated_at,
       CASE WHEN f.owner_org_id = %(org_id)s THEN 'owner' ELSE coalesce(m.status, 'none') END AS role
FROM federations AS f
LEFT JOIN federation_members AS m ON m.federation_id = f.id AND m.org_id = %(org_id)s
WHERE f.id = %(federation_id)s;

-- name: list_federations
-- The federations an organization owns or is an active member of, newest first.
SELECT f.id, f.name, f.description, f.owner_org_id, f.total_epsilon_budget, f.total_delta_budget,
       f.min_round_updates,
       jsonb_build_object('min_group_size', f.analytics_min_group_size,
                          'allow_min_max', f.analytics_allow_min_max,
                          'variables', f.analytics_variables) AS analytics_policy,
       f.created_at, f.updated_at
FROM federations AS f
JOIN federation_members AS m ON m.federation_id = f.id AND m.org_id = %(org_id)s AND m.status = 'active'
WHERE %(name)s::text IS NULL OR f.name ILIKE '%%' || %(name)s || '%%'
ORDER BY f.created_at DESC, f.id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_federations
-- How many federations list_federations pages through.
SELECT count(*)
FROM federations AS f
JOIN federation_members AS m ON m.federation_id = f.id AND m.org_id = %(org_id)s AND m.status = 'active'
WHERE %(name)s::text IS NULL OR f.name ILIKE '%%' || %(name)s || '%%';

-- name: count_orgs
-- How many of the given organization ids exist.
SELECT count(*) FROM orgs WHERE id = ANY(%(org_ids)s);

-- name: upsert_invitations
-- Invite organizations; an existing row (invited or active) is returned unchanged.
WITH wanted AS (
    SELECT DISTINCT unnest(%(org_ids)s::text[]) AS org_id
), inserted AS (
    INSERT INTO federation_members (id, federation_id, org_id, status)
    SELECT 'inv_' || md5(random()::text || clock_timestamp()::text || w.org_id), %(federation_id)s, w.org_id, 'invited'
    FROM wanted AS w
    ON CONFLICT (federation_id, org_id) DO NOTHING
    RETURNING id, federation_id, org_id, status, created_at, updated_at, joined_at
)
SELECT * FROM inserted
UNION ALL
SELECT m.id, m.federation_id, m.org_id, m.status, m.created_at, m.updated_at, m.joined_at
FROM federation_members AS m JOIN wanted AS w ON w.org_id = m.org_id
WHERE m.federation_id = %(federation_id)s AND m.org_id NOT IN (SELECT org_id FROM inserted)
ORDER BY org_id;

-- name: update_membership_joined
-- Accept an invitation; an active membership stays as it is.
UPDATE federation_members
SET status = 'active', joined_at = coalesce(joined_at, now()),
    updated_at = CASE WHEN status = 'active' THEN updated_at ELSE now() END
WHERE federation_id = %(federation_id)s AND org_id = %(org_id)s
RETURNING id, federation_id, org_id, status, created_at, updated_at, joined_at;

-- name: list_members
-- Members with contributions from completed rounds without DP; an organization's updates in a round enter its totals and averages only when it sent at least min_round_updates there.
WITH per_round AS (
    SELECT u.org_id, r.id AS round_id, r.finished_at,
           count(*) >= f.min_round_updates AS mixed,
           sum(u.sample_count) AS samples,
           sum(u.accuracy * u.sample_count) AS accuracy_sum,
           sum(u.sample_count) FILTER (WHERE u.accuracy IS NOT NULL) AS accuracy_weight,
           sum(u.loss * u.sample_count) AS loss_sum,
           sum(u.sample_count) FILTER (WHERE u.loss IS NOT NULL) AS loss_weight
    FROM training_rounds AS r
    JOIN federations AS f ON f.id = r.federation_id
    JOIN training_updates AS u ON u.round_id = r.id
    WHERE r.federation_id = %(federation_id)s AND r.state = 'completed' AND r.dp_config IS NULL
    GROUP BY u.org_id, r.id, r.finished_at, f.min_round_updates
)
SELECT m.org_id, m.status, m.joined_at,
       count(p.round_id) AS rounds_contributed,
       (sum(p.samples) FILTER (WHERE p.mixed))::bigint AS total_samples,
       sum(p.accuracy_sum) FILTER (WHERE p.mixed)
           / nullif(sum(p.accuracy_weight) FILTER (WHERE p.mixed), 0) AS avg_accuracy,
       sum(p.loss_sum) FILTER (WHERE p.mixed)
           / nullif(sum(p.loss_weight) FILTER (WHERE p.mixed), 0) AS avg_loss,
       max(p.finished_at) AS last_contribution_at
FROM federation_members AS m
LEFT JOIN per_round AS p ON p.org_id = m.org_id
WHERE m.federation_id = %(federation_id)s
GROUP BY m.id, m.org_id, m.status, m.joined_at, m.created_at
ORDER BY m.created_at, m.org_id;
