-- name: list_updates
-- Metadata of the updates made by one organization's devices for a model, newest first.
SELECT u.id, u.round_id, u.device_id, u.org_id, u.model_id, u.version, u.sample_count, u.update_format,
       u.encoding, u.sha256, u.size_bytes, u.metrics, u.loss, u.accuracy, u.received_at
FROM training_updates AS u
WHERE u.model_id = %(model_id)s AND (%(version)s::integer IS NULL OR u.version = %(version)s)
  AND u.org_id = %(org_id)s
ORDER BY u.received_at DESC, u.id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_updates
-- How many rows list_updates pages through.
SELECT count(*) FROM training_updates AS u
WHERE u.model_id = %(model_id)s AND (%(version)s::integer IS NULL OR u.version = %(version)s)
  AND u.org_id = %(org_id)s;

-- name: get_update_stats
-- Count, samples and latest arrival of a model's updates in the rounds an organization may read (its own, its federations'); another organization's only once their round completed without DP.
SELECT count(*) AS update_count, coalesce(sum(u.sample_count), 0)::bigint AS total_samples,
       max(u.received_at) AS last_received_at
FROM training_updates AS u
JOIN training_rounds AS r ON r.id = u.round_id
WHERE u.model_id = %(model_id)s AND (%(version)s::integer IS NULL OR u.version = %(version)s)
  AND (r.org_id = %(org_id)s OR r.federation_id IN (
           SELECT federation_id FROM federation_members WHERE org_id = %(org_id)s AND status = 'active'))
  -- Live totals would show one device's sample count between two polls; a private round's are not noised.
  AND (u.org_id = %(org_id)s OR (r.state = 'completed' AND r.dp_config IS NULL));

-- name: list_device_contributions
-- Per device of one organization: updates and samples for a model, most recently active first.
SELECT u.device_id, count(*) AS update_count, sum(u.sample_count)::bigint AS total_samples,
       max(u.received_at) AS last_received_at
FROM training_updates AS u
WHERE u.model_id = %(model_id)s AND (%(version)s::integer IS NULL OR u.version = %(version)s)
  AND u.org_id = %(org_id)s
GROUP BY u.device_id
ORDER BY max(u.received_at) DESC, u.device_id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_contributing_devices
-- How many devices list_device_contributions pages through.
SELECT count(DISTINCT u.device_id) FROM training_updates AS u
WHERE u.model_id = %(model_id)s AND (%(version)s::integer IS NULL OR u.version = %(version)s)
  AND u.org_id = %(org_id)s;

-- name: list_participation
-- Per organization whose devices updated the model in a round the caller may read (its own, its federations'): devices and updates, counts only; another organization's once their round completed without DP.
SELECT u.org_id, count(DISTINCT u.device_id) AS devices, count(*) AS updates
FROM training_updates AS u
JOIN training_rounds AS r ON r.id = u.round_id
WHERE u.model_id = %(model_id)s AND (%(version)s::integer IS NULL OR u.version = %(version)s)
  AND (r.org_id = %(org_id)s OR r.federation_id IN (
           SELECT federation_id FROM federation_members WHERE org_id = %(org_id)s AND status = 'active'))
  AND (u.org_id = %(org_id)s OR (r.state = 'completed' AND r.dp_config IS NULL))
GROUP BY u.org_id
ORDER BY u.org_id;
