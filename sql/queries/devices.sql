-- name: insert_device
-- A new device (capabilities it did not report are null) and its group memberships in one statement; only the token's hash is stored.
WITH device AS (
    INSERT INTO devices (id, org_id, token_hash, platform, os_version, model, app_version,
                         battery_pct, charging, network_type, available_storage_mb,
                         registered_by_key)
    VALUES (%(id)s, %(org_id)s, %(token_hash)s, %(platform)s, %(os_version)s, %(model)s,
            %(app_version)s, %(battery_pct)s, %(charging)s, %(network_type)s,
            %(available_storage_mb)s, %(registered_by_key)s)
    RETURNING id, org_id, platform, os_version, model, app_version, battery_pct, charging,
              network_type, available_storage_mb, reported_state, registered_at, last_seen_at,
              revoked_at, revoke_reason
), members AS (
    INSERT INTO device_group_members (group_id, device_id)
    SELECT DISTINCT g.id, device.id
    FROM device, unnest(%(group_ids)s::text[]) AS g (id)
    RETURNING group_id
)
SELECT d.id, d.org_id, d.platform, d.os_version, d.model, d.app_version, d.battery_pct,
       d.charging, d.network_type, d.available_storage_mb, d.reported_state AS state,
       ARRAY(SELECT m.group_id FROM members AS m ORDER BY m.group_id) AS group_ids,
       d.registered_at, d.last_seen_at, d.revoked_at, d.revoke_reason
FROM device AS d;

-- name: get_device
-- One device with the groups it belongs to.
SELECT d.id, d.org_id, d.platform, d.os_version, d.model, d.app_version, d.battery_pct,
       d.charging, d.network_type, d.available_storage_mb, d.reported_state AS state,
       ARRAY(SELECT m.group_id FROM device_group_members AS m
             WHERE m.device_id = d.id ORDER BY m.group_id) AS group_ids,
       d.registered_at, d.last_seen_at, d.revoked_at, d.revoke_reason
FROM devices AS d
WHERE d.id = %(device_id)s;

-- name: list_devices
-- An organization's devices matching the filters (a null filter matches all), newest first.
SELECT d.id, d.org_id, d.platform, d.os_version, d.model, d.app_version, d.battery_pct,
       d.charging, d.network_type, d.available_storage_mb, d.reported_state AS state,
       ARRAY(SELECT m.group_id FROM device_group_members AS m
             WHERE m.device_id = d.id ORDER BY m.group_id) AS group_ids,
       d.registered_at, d.last_seen_at, d.revoked_at, d.revoke_reason
FROM devices AS d
WHERE d.org_id = %(org_id)s
  AND (%(platform)s::text IS NULL OR d.platform = %(platform)s)
  AND (%(network_type)s::text IS NULL OR d.network_type = %(network_type)s)
  AND (%(charging)s::boolean IS NULL OR d.charging = %(charging)s)
  AND (%(min_battery)s::integer IS NULL OR d.battery_pct >= %(min_battery)s)
  AND (%(seen_within_seconds)s::integer IS NULL
       OR d.last_seen_at >= now() - make_interval(secs => %(seen_within_seconds)s))
  AND (%(device_group_id)s::text IS NULL OR EXISTS (
       SELECT 1 FROM device_group_members AS m
       WHERE m.group_id = %(device_group_id)s AND m.device_id = d.id))
ORDER BY d.registered_at DESC, d.id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_devices
-- How many devices list_devices would page through.
SELECT count(*) FROM devices AS d
WHERE d.org_id = %(org_id)s
  AND (%(platform)s::text IS NULL OR d.platform = %(platform)s)
  AND (%(network_type)s::text IS NULL OR d.network_type = %(network_type)s)
  AND (%(charging)s::boolean IS NULL OR d.charging = %(charging)s)
  AND (%(min_battery)s::integer IS NULL OR d.battery_pct >= %(min_battery)s)
  AND (%(seen_within_seconds)s::integer IS NULL
       OR d.last_seen_at >= now() - make_interval(secs => %(seen_within_seconds)s))
  AND (%(device_group_id)s::text IS NULL OR EXISTS (
       SELECT 1 FROM device_group_members AS m
       WHERE m.group_id = %(device_group_id)s AND m.device_id = d.id));

-- name: list_device_owners
-- The organization of each device among the ids (unknown ids have no row).
SELECT id, org_id FROM devices WHERE id = ANY(%(device_ids)s::text[]);

-- name: update_device_states
-- Heartbeats of several devices in one statement (group commit), one JSON object per device.
-- Each device not revoked is marked seen, keeps what it did not report (null or absent), and
-- is answered with its offers (running rounds it is selected in, before their deadline, with no
-- update from it yet) and its stop instructions (its rounds cancelled or failed in the last
-- day); a revoked or unknown device gets no row. The caller passes each device id once.
WITH seen AS (
    UPDATE devices AS d SET
        last_seen_at = now(),
        battery_pct = coalesce(b.battery_pct, d.battery_pct),
        charging = coalesce(b.charging, d.charging),
        network_type = coalesce(b.network_type, d.network_type),
        available_storage_mb = coalesce(b.available_storage_mb, d.available_storage_mb),
        app_version = coalesce(b.app_version, d.app_version),
        reported_state = coalesce(b.state, d.reported_state)
    FROM jsonb_to_recordset(%(calls)s::jsonb)
         AS b (device_id text, battery_pct integer, charging boolean, network_type text,
               available_storage_mb bigint, app_version text, state jsonb)
    WHERE d.id = ANY(%(keys)s::text[]) AND d.id = b.device_id AND d.revoked_at IS NULL
    RETURNING d.id, d.last_seen_at
)
SELECT seen.id AS device_id, seen.last_seen_at,
       coalesce((
           SELECT json_agg(json_build_object(
                      'round_id', r.id, 'model_id', r.model_id, 'base_version', r.base_version,
                      'object_key', a.object_key, 'weights_sha256', a.sha256,
                      'weights_size_bytes', a.size_bytes, 'update_format', r.update_format,
                      'strategy', r.strategy, 'client_config', r.client_config, 'deadline', r.deadline_at,
                      'differential_privacy', r.dp_config, 'secure_aggregation', r.secagg_config,
                      'max_sample_count', r.max_sample_count, 'max_update_norm', r.max_update_norm)
                  ORDER BY r.deadline_at)
           FROM round_devices AS rd
           JOIN training_rounds AS r ON r.id = rd.round_id
           JOIN model_artifacts AS a
             ON a.model_id = r.model_id AND a.version = r.base_version AND a.kind = 'safetensors'
           WHERE rd.device_id = seen.id AND r.state = 'running' AND r.deadline_at > now()
             AND NOT EXISTS (SELECT 1 FROM training_updates AS u
                             WHERE u.round_id = r.id AND u.device_id = seen.id)
       ), '[]'::json) AS round_offers,
       coalesce((
           SELECT json_agg(json_build_object('round_id', r.id, 'state', r.state,
                                             'reason', coalesce(r.cancel_reason, r.failure_reason))
                  ORDER BY r.finished_at)
           FROM round_devices AS rd JOIN training_rounds AS r ON r.id = rd.round_id
           WHERE rd.device_id = seen.id AND r.state IN ('cancelled', 'failed')
             AND r.finished_at > now() - interval '1 day'
       ), '[]'::json) AS stop_rounds
FROM seen;

-- name: revoke_device
-- Revoke a device for good (revoking twice keeps the first time and reason).
UPDATE devices SET revoked_at = coalesce(revoked_at, now()),
                   revoke_reason = CASE WHEN revoked_at IS NULL THEN %(reason)s ELSE revoke_reason END
WHERE id = %(device_id)s
RETURNING id AS device_id, revoked_at, revoke_reason;

-- name: update_device_token
-- Replace a device's token, only while the token it called with is current and it is not revoked.
UPDATE devices SET token_hash = %(token_hash)s
WHERE id = %(device_id)s AND token_hash = %(current_hash)s AND revoked_at IS NULL
RETURNING id AS device_id;
