-- name: find_analytics_policy
-- A federation's analytics policy: the privacy floor, whether min and max may be shown, the declared variables.
SELECT analytics_min_group_size AS min_group_size, analytics_allow_min_max AS allow_min_max,
       analytics_variables AS variables, total_epsilon_budget, total_delta_budget, owner_org_id
FROM federations WHERE id = %(federation_id)s;

-- name: list_member_orgs
-- The organizations of a federation's active members (the groups of group_by federation_member).
SELECT org_id FROM federation_members
WHERE federation_id = %(federation_id)s AND status = 'active'
ORDER BY org_id;

-- name: list_device_clipped_sums
-- Per group: its devices' count, and the sum and sum of squares of each device's mean clipped value less mid; a device counts in one group (its first).
WITH scoped AS (
    SELECT group_id, device_id, value
    FROM analytics_scope(%(federation_id)s, %(org_id)s, %(variable)s, %(group_by)s, %(group_ids)s,
                         %(start_time)s, %(end_time)s, %(device_platform)s)
    WHERE value IS NOT NULL
), first_group AS (
    SELECT device_id, min(group_id) AS group_id FROM scoped GROUP BY device_id
), per_device AS (
    SELECT s.group_id, avg(least(greatest(s.value, %(lower)s), %(upper)s)) - %(mid)s AS y
    FROM scoped AS s JOIN first_group AS f USING (device_id, group_id)
    GROUP BY s.group_id, s.device_id
)
SELECT group_id, count(*) AS n, sum(y) AS sum, sum(y * y) AS sum_squares
FROM per_device GROUP BY group_id ORDER BY group_id;

-- name: list_group_device_summaries
-- Per (group, device): count, missing, min, max and sums about the group's provisional centre (its avg: two hash-aggregate passes, no sort; stable at 1e8 + N(0,1)).
WITH centre AS (
    SELECT group_id, coalesce(avg(value), 0) AS centre
    FROM analytics_scope(%(federation_id)s, %(org_id)s, %(variable)s, %(group_by)s, %(group_ids)s,
                         %(start_time)s, %(end_time)s, %(device_platform)s)
    GROUP BY group_id
)
SELECT s.group_id, s.device_id, count(s.value) AS n,
       count(*) FILTER (WHERE s.value IS NULL AND s.category IS NULL) AS missing,
       c.centre, coalesce(sum(s.value - c.centre), 0) AS shift,
       coalesce(sum((s.value - c.centre) ^ 2), 0) AS m2_about_centre,
       min(s.value) AS min, max(s.value) AS max
FROM analytics_scope(%(federation_id)s, %(org_id)s, %(variable)s, %(group_by)s, %(group_ids)s,
                     %(start_time)s, %(end_time)s, %(device_platform)s) AS s
JOIN centre AS c USING (group_id)
GROUP BY s.group_id, s.device_id, c.centre;

-- name: find_overall_summary
-- Summary over the distinct observations of the shown groups when some device is in two of them (counted once).
WITH scoped AS (
    SELECT DISTINCT ON (id) device_id, value, category
    FROM analytics_scope(%(federation_id)s, %(org_id)s, %(variable)s, %(group_by)s, %(group_ids)s,
                         %(start_time)s, %(end_time)s, %(device_platform)s)
    ORDER BY id
), centre AS (
    SELECT coalesce(avg(value), 0) AS centre FROM scoped
)
SELECT 'overall' AS group_id, count(DISTINCT s.device_id) FILTER (WHERE s.value IS NOT NULL) AS devices,
       count(s.value) AS n,
       count(*) FILTER (WHERE s.value IS NULL AND s.category IS NULL) AS missing,
       c.centre, coalesce(sum(s.value - c.centre), 0) AS shift,
       coalesce(sum((s.value - c.centre) ^ 2), 0) AS m2_about_centre,
       min(s.value) AS min, max(s.value) AS max
FROM scoped AS s CROSS JOIN centre AS c
GROUP BY c.centre;

-- name: list_group_percentiles
-- Per shown group and over them all (group_id null; a device in two groups counted twice there): the 25th, 50th and 75th percentiles, linear interpolation (numpy's default).
SELECT group_id, percentile_cont(ARRAY[0.25, 0.5, 0.75]) WITHIN GROUP (ORDER BY value) AS percentiles
FROM analytics_scope(%(federation_id)s, %(org_id)s, %(variable)s, %(group_by)s, %(group_ids)s,
                     %(start_time)s, %(end_time)s, %(device_platform)s)
WHERE value IS NOT NULL
GROUP BY GROUPING SETS ((group_id), ());

-- name: find_overall_percentiles
-- The percentiles over the distinct observations of the shown groups when some device is in two of them.
SELECT percentile_cont(ARRAY[0.25, 0.5, 0.75]) WITHIN GROUP (ORDER BY value) AS percentiles
FROM (SELECT DISTINCT ON (id) value
      FROM analytics_scope(%(federation_id)s, %(org_id)s, %(variable)s, %(group_by)s, %(group_ids)s,
                           %(start_time)s, %(end_time)s, %(device_platform)s)
      WHERE value IS NOT NULL ORDER BY id) AS scoped;

-- name: list_histogram_counts
-- Per shown group: counts (and devices) in equal-width bins of [lower, upper); bin 0 below, bins + 1 at or above.
SELECT group_id, width_bucket(value, %(lower)s, %(upper)s, %(bins)s) AS bin, count(*) AS count,
       count(DISTINCT device_id) AS devices
FROM analytics_scope(%(federation_id)s, %(org_id)s, %(variable)s, %(group_by)s, %(group_ids)s,
                     %(start_time)s, %(end_time)s, %(device_platform)s)
WHERE value IS NOT NULL
GROUP BY group_id, bin
ORDER BY group_id, bin;

-- name: list_contingency_counts
-- Devices by their latest category of each of two variables (a device counts once, in one cell), and how many of them are the asking organization's.
WITH first AS (
    SELECT DISTINCT ON (device_id) device_id, org_id, category
    FROM analytics_scope(%(federation_id)s, %(org_id)s, %(variable_1)s, %(group_by)s, %(group_ids)s,
                         %(start_time)s, %(end_time)s, %(device_platform)s)
    WHERE category IS NOT NULL
    ORDER BY device_id, recorded_at DESC, id DESC
), second AS (
    SELECT DISTINCT ON (device_id) device_id, category
    FROM analytics_scope(%(federation_id)s, %(org_id)s, %(variable_2)s, %(group_by)s, %(group_ids)s,
                         %(start_time)s, %(end_time)s, %(device_platform)s)
    WHERE category IS NOT NULL
    ORDER BY device_id, recorded_at DESC, id DESC
)
SELECT a.category AS row, b.category AS col, count(*) AS count,
       count(*) FILTER (WHERE a.org_id = %(org_id)s) AS own
FROM first AS a JOIN second AS b USING (device_id)
GROUP BY a.category, b.category
ORDER BY a.category, b.category;

-- name: insert_query
-- Record a question and its outcome (completed with a result, or failed with the reason).
INSERT INTO analytics_queries (id, federation_id, org_id, query_type, params, status, result, error_message,
                               shared, completed_at)
VALUES (%(id)s, %(federation_id)s, %(org_id)s, %(query_type)s, %(params)s, %(status)s, %(result)s,
        %(error_message)s, %(shared)s, now());
