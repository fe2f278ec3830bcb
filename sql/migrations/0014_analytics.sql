-- Federated analytics (issue 12, docs/analytics.md): what devices report, the
-- kind of each variable per organization, the federation's analytics policy
-- and every question asked.

ALTER TABLE federations
    -- Groups smaller than this are suppressed in every answer.
    ADD COLUMN analytics_min_group_size integer NOT NULL DEFAULT 10
        CHECK (analytics_min_group_size BETWEEN 2 AND 1000000),
    -- Whether answers may show a group's min and max (single devices' values).
    ADD COLUMN analytics_allow_min_max boolean NOT NULL DEFAULT false,
    -- Declared variables, {name: "numeric" | "categorical"}; NULL: any name.
    ADD COLUMN analytics_variables jsonb;

-- One observation of one variable by one device. The server attaches the
-- device's organization, platform and device groups when it stores the row.
-- Neither value nor category: the device reports the variable as missing.
CREATE TABLE analytics_observations (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id    text NOT NULL REFERENCES devices (id),
    org_id       text NOT NULL REFERENCES orgs (id),
    platform     text NOT NULL,
    group_ids    text[] NOT NULL DEFAULT '{}',
    variable     text NOT NULL,
    value        double precision CHECK (abs(value) <= 1e15),
    category     text,
    recorded_at  timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (value IS NULL OR category IS NULL)
);
CREATE INDEX analytics_observations_variable_idx ON analytics_observations (variable, org_id, recorded_at);

-- A variable is numeric or categorical for an organization from its first report on.
CREATE TABLE analytics_variables (
    org_id  text NOT NULL REFERENCES orgs (id),
    name    text NOT NULL,
    kind    text NOT NULL CHECK (kind IN ('numeric', 'categorical')),
    PRIMARY KEY (org_id, name)
);

CREATE TABLE analytics_queries (
    id             text PRIMARY KEY,
    federation_id  text NOT NULL REFERENCES federations (id),
    org_id         text NOT NULL REFERENCES orgs (id),
    query_type     text NOT NULL CHECK (query_type IN ('descriptive', 't_test', 'anova', 'chi_square')),
    params         jsonb NOT NULL,
    status         text NOT NULL CHECK (status IN ('completed', 'failed')),
    result         jsonb,
    error_message  text,
    -- false: the question names the asking organization's device groups (its ids stay with it),
    -- so only the asking organization reads it.
    shared         boolean NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    completed_at   timestamptz
);
CREATE INDEX analytics_queries_federation_idx ON analytics_queries (federation_id, created_at DESC);

-- The observations one question of a federation looks at, one row per
-- (observation, group): the devices of its active members (the owner is one),
-- grouped by member organization, or by device group (a device in two groups
-- counts in both). Device groups are those of the asking organization only:
-- another organization's device group ids stay with it (docs/design.md), so
-- cross-organization questions group by member. Every analytics query reads
-- its rows through this function, so who is in scope is decided in one place;
-- the planner inlines it (one SQL statement, STABLE).
CREATE FUNCTION analytics_scope(
    p_federation_id text, p_org_id text, p_variable text, p_group_by text, p_group_ids text[],
    p_start timestamptz, p_end timestamptz, p_platform text
) RETURNS TABLE (
    id bigint, group_id text, device_id text, org_id text, value double precision, category text,
    recorded_at timestamptz
) LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT o.id, k.group_id, o.device_id, o.org_id, o.value, o.category, o.recorded_at
    FROM analytics_observations AS o
    JOIN federation_members AS m
      ON m.org_id = o.org_id AND m.federation_id = p_federation_id AND m.status = 'active'
    CROSS JOIN LATERAL unnest(CASE WHEN p_group_by = 'federation_member' THEN ARRAY[o.org_id]
                                   ELSE o.group_ids END) AS k (group_id)
    WHERE o.variable = p_variable
      AND (p_group_by = 'federation_member' OR o.org_id = p_org_id)
      AND (p_start IS NULL OR o.recorded_at >= p_start)
      AND (p_end IS NULL OR o.recorded_at < p_end)
      AND (p_platform IS NULL OR o.platform = p_platform)
      AND (p_group_ids IS NULL OR k.group_id = ANY (p_group_ids))
      -- The same test before the unnest, so rows of other groups are dropped early.
      AND (p_group_ids IS NULL
           OR CASE WHEN p_group_by = 'federation_member' THEN o.org_id = ANY (p_group_ids)
                   ELSE o.group_ids && p_group_ids END)
$$;
