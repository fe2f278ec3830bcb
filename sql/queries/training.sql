-- name: insert_round
-- A new round in state pending.
INSERT INTO training_rounds (id, org_id, model_id, base_version, federation_id, target_device_count,
                             min_updates, deadline_seconds, update_format, strategy, strategy_params,
                             client_config, dp_config, secagg_config, auto_aggregate, max_sample_count,
                             max_update_norm)
VALUES (%(id)s, %(org_id)s, %(model_id)s, %(base_version)s, %(federation_id)s, %(target_device_count)s,
        %(min_updates)s, %(deadline_seconds)s, %(update_format)s, %(strategy)s, %(strategy_params)s,
        %(client_config)s, %(dp_config)s, %(secagg_config)s, %(auto_aggregate)s, %(max_sample_count)s,
        %(max_update_norm)s)
RETURNING id;

-- name: find_round
-- One round with the role of an organization: owner (its org), member (active in its federation) or none.
SELECT r.*, CASE WHEN r.org_id = %(org_id)s THEN 'owner'
                 WHEN EXISTS (SELECT 1 FROM federation_members AS m
                              WHERE m.federation_id = r.federation_id AND m.org_id = %(org_id)s
                                AND m.status = 'active') THEN 'member'
                 ELSE 'none' END AS role
FROM training_rounds AS r WHERE r.id = %(round_id)s;

-- name: lock_round
-- One round, locked for a state change.
SELECT * FROM training_rounds WHERE id = %(round_id)s FOR UPDATE;

-- name: list_round_devices
-- The devices of one organization selected for a round.
SELECT r.device_id FROM round_devices AS r JOIN devices AS d ON d.id = r.device_id
WHERE r.round_id = %(round_id)s AND d.org_id = %(org_id)s ORDER BY r.device_id;

-- name: list_round_participation
-- Per organization: how many of its devices a round selected and how many updates they sent.
SELECT d.org_id, count(*) AS selected, count(u.id) AS updates
FROM round_devices AS r
JOIN devices AS d ON d.id = r.device_id
LEFT JOIN training_updates AS u ON u.round_id = r.round_id AND u.device_id = r.device_id
WHERE r.round_id = %(round_id)s
GROUP BY d.org_id ORDER BY d.org_id;

-- name: list_rounds
-- Rounds of an organization and of the federations it is an active member of, newest first.
SELECT r.* FROM training_rounds AS r
WHERE (r.org_id = %(org_id)s OR r.federation_id IN (
          SELECT federation_id FROM federation_members WHERE org_id = %(org_id)s AND status = 'active'))
  AND (%(model_id)s::text IS NULL OR r.model_id = %(model_id)s)
  AND (%(federation_id)s::text IS NULL OR r.federation_id = %(federation_id)s)
  AND (%(state)s::text IS NULL OR r.state = %(state)s)
ORDER BY r.created_at DESC, r.id
LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_rounds
-- How many rounds list_rounds pages through.
SELECT count(*) FROM training_rounds AS r
WHERE (r.org_id = %(org_id)s OR r.federation_id IN (
          SELECT federation_id FROM federation_members WHERE org_id = %(org_id)s AND status = 'active'))
  AND (%(model_id)s::text IS NULL OR r.model_id = %(model_id)s)
  AND (%(federation_id)s::text IS NULL OR r.federation_id = %(federation_id)s)
  AND (%(state)s::text IS NULL OR r.state = %(state)s);

-- name: get_round_progress
-- Counts for polling, in one query.
SELECT r.id AS round_id, r.state,
       (SELECT count(*) FROM round_devices AS d WHERE d.round_id = r.id) AS selected_count,
       (SELECT count(*) FROM training_updates AS u WHERE u.round_id = r.id) AS received_count,
       (SELECT coalesce(sum(u.sample_count), 0)::bigint FROM training_updates AS u WHERE u.round_id = r.id)
           AS total_samples,
       r.deadline_at AS deadline,
       CASE WHEN r.state = 'running'
            THEN greatest(0, extract(epoch FROM r.deadline_at - now()))::double precision END AS seconds_remaining
FROM training_rounds AS r WHERE r.id = %(round_id)s;

-- name: list_eligible_devices
-- Devices that may train in a round: of the given organizations, not revoked, meeting every criterion.
SELECT d.id, d.platform FROM devices AS d
WHERE d.org_id = ANY(%(org_ids)s) AND d.revoked_at IS NULL
  AND (%(platform)s::text IS NULL OR d.platform = %(platform)s)
  AND (%(network_type)s::text IS NULL OR d.network_type = %(network_type)s)
  AND (%(charging)s::boolean IS NULL OR d.charging = %(charging)s)
  AND (%(min_battery)s::integer IS NULL OR d.battery_pct >= %(min_battery)s)
  AND (%(heartbeat_max_age_seconds)s::integer IS NULL
       OR d.last_seen_at >= now() - make_interval(secs => %(heartbeat_max_age_seconds)s))
  AND (%(device_group_id)s::text IS NULL OR EXISTS (
       SELECT 1 FROM device_group_members AS g WHERE g.group_id = %(device_group_id)s AND g.device_id = d.id))
  AND (%(min_app_version)s::text IS NULL
       OR app_version_key(d.app_version) >= app_version_key(%(min_app_version)s))
  AND (%(max_app_version)s::text IS NULL
       OR app_version_key(d.app_version) <= app_version_key(%(max_app_version)s));

-- name: list_member_orgs
-- The active member organizations of a federation.
SELECT org_id FROM federation_members WHERE federation_id = %(federation_id)s AND status = 'active';

-- name: insert_round_devices
-- Record the selection.
INSERT INTO round_devices (round_id, device_id)
SELECT %(round_id)s, unnest(%(device_ids)s::text[]);

-- name: update_round_selected
-- pending -> selected, with what the privacy accounting needs later.
UPDATE training_rounds
SET state = 'selected', selection_seed = %(seed)s, selection_criteria = %(criteria)s,
    eligible_count = %(eligible_count)s, selection_method = %(method)s, sample_rate = %(sample_rate)s,
    updated_at = now()
WHERE id = %(round_id)s AND state = 'pending';

-- name: update_round_failed_empty_draw
-- selected -> failed: a private round's Poisson draw chose no device (the draw is charged all the same).
UPDATE training_rounds
SET state = 'failed', failure_reason = %(reason)s, finished_at = now(), updated_at = now()
WHERE id = %(round_id)s AND state = 'selected';

-- name: update_round_started
-- pending/selected -> running; the deadline starts now.
UPDATE training_rounds
SET state = 'running', started_at = now(), deadline_at = now() + make_interval(secs => deadline_seconds),
    updated_at = now()
WHERE id = %(round_id)s AND state IN ('pending', 'selected');

-- name: update_round_cancelled
-- pending/selected/running/aggregating -> cancelled; an aggregation in flight loses its claim and publishes nothing.
UPDATE training_rounds
SET state = 'cancelled', cancel_reason = %(reason)s, finished_at = now(), aggregation_claim = NULL,
    aggregation_lease_until = NULL, aggregation_started_at = NULL, next_aggregation_at = NULL, updated_at = now()
WHERE id = %(round_id)s AND state IN ('pending', 'selected', 'running', 'aggregating');

-- name: find_round_state
-- The current state of a round.
SELECT state FROM training_rounds WHERE id = %(round_id)s;

-- name: find_model_in_federation
-- Whether a model is shared into a federation.
SELECT true FROM federation_models WHERE model_id = %(model_id)s AND federation_id = %(federation_id)s;

-- name: get_round_federation
-- The federation a round runs in, with the rules it sets for its rounds.
SELECT id, name, description, owner_org_id, total_epsilon_budget, total_delta_budget, min_round_updates,
       created_at, updated_at
FROM federations WHERE id = %(federation_id)s;

-- name: get_round_mix
-- The organization of each given update of a round, and the organizations its selection reached.
SELECT coalesce((SELECT array_agg(u.org_id) FROM training_updates AS u
                 WHERE u.round_id = %(round_id)s AND u.id = ANY(%(update_ids)s)), '{}') AS update_orgs,
       coalesce((SELECT array_agg(DISTINCT d.org_id) FROM round_devices AS r
                 JOIN devices AS d ON d.id = r.device_id
                 WHERE r.round_id = %(round_id)s), '{}') AS selected_orgs;

-- name: find_round_charged
-- Whether a round has its entry in its federation's privacy ledger.
SELECT true FROM privacy_ledger WHERE federation_id = %(federation_id)s AND round_id = %(round_id)s;
