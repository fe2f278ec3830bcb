-- name: list_queries
-- The questions asked in the federations an organization is an active member of (those naming another organization's device groups excepted), newest first.
SELECT q.id, q.federation_id, q.query_type, q.params, q.status, q.result, q.error_message, q.created_at,
       q.completed_at
FROM analytics_queries AS q
JOIN federation_members AS m ON m.federation_id = q.federation_id AND m.org_id = %(org_id)s AND m.status = 'active'
WHERE (%(federation_id)s::text IS NULL OR q.federation_id = %(federation_id)s)
  AND (q.shared OR q.org_id = %(org_id)s)
ORDER BY q.created_at DESC, q.id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_queries
-- How many questions list_queries would page through.
SELECT count(*)
FROM analytics_queries AS q
JOIN federation_members AS m ON m.federation_id = q.federation_id AND m.org_id = %(org_id)s AND m.status = 'active'
WHERE (%(federation_id)s::text IS NULL OR q.federation_id = %(federation_id)s)
  AND (q.shared OR q.org_id = %(org_id)s);

-- name: find_query
-- One question, if the organization is an active member of its federation and the question is shared or its own.
SELECT q.id, q.federation_id, q.query_type, q.params, q.status, q.result, q.error_message, q.created_at,
       q.completed_at
FROM analytics_queries AS q
WHERE q.id = %(query_id)s
  AND (q.shared OR q.org_id = %(org_id)s)
  AND EXISTS (SELECT 1 FROM federation_members AS m
              WHERE m.federation_id = q.federation_id AND m.org_id = %(org_id)s AND m.status = 'active');
