-- name: find_secagg_target
-- A round as one device taking part in its SecAgg+ session sees it: state, selection, membership, cohort size, base manifest.
SELECT r.id, r.org_id, r.state, r.secagg_config, r.dp_config, r.update_format, r.max_sample_count,
       r.min_updates, r.model_id, r.base_version, r.federation_id,
       EXISTS (SELECT 1 FROM round_devices AS d
               WHERE d.round_id = r.id AND d.device_id = %(device_id)s) AS selected,
       EXISTS (SELECT 1 FROM devices AS x
               WHERE x.id = %(device_id)s AND x.revoked_at IS NOT NULL) AS revoked,
       CASE WHEN r.federation_id IS NULL THEN r.org_id = %(org_id)s
            ELSE EXISTS (SELECT 1 FROM federation_members AS m
                         WHERE m.federation_id = r.federation_id AND m.org_id = %(org_id)s
                           AND m.status = 'active') END AS member,
       (SELECT count(*) FROM round_devices AS d WHERE d.round_id = r.id) AS selected_count,
       v.manifest
FROM training_rounds AS r
JOIN model_versions AS v ON v.model_id = r.model_id AND v.version = r.base_version
WHERE r.id = %(round_id)s;

-- name: insert_session
-- Start a round's SecAgg+ session on the first setup call (no stage ends after the round's deadline); a concurrent first call loses quietly.
INSERT INTO secagg_sessions (id, round_id, config, stage_seconds, stage_deadline)
SELECT %(id)s, r.id, %(config)s, %(stage_seconds)s,
       least(now() + make_interval(secs => %(stage_seconds)s), r.deadline_at)
FROM training_rounds AS r WHERE r.id = %(round_id)s
ON CONFLICT (round_id) DO NOTHING;

-- name: get_session_for_update
-- A round's session, locked for this transaction: every stage call of one session runs in turn.
SELECT s.id, s.round_id, s.stage, s.seed, s.config, s.stage_seconds, s.stage_deadline, s.failure_reason,
       s.result_key, s.result_sha256, s.total_weight, s.survivors, s.stage_deadline <= now() AS past_deadline,
       r.deadline_at <= now() AS round_past_deadline
FROM secagg_sessions AS s JOIN training_rounds AS r ON r.id = s.round_id
WHERE s.round_id = %(round_id)s
FOR UPDATE OF s;

-- name: find_session_config
-- A session's config, if it is the round's (read without the lock, to check a call before its payload is read).
SELECT config FROM secagg_sessions WHERE round_id = %(round_id)s AND id = %(session_id)s;

-- name: update_session_stage
-- Move a session to its next stage with a fresh stage deadline, never after the round's (and, at stage 0's close, its seed and final config).
UPDATE secagg_sessions AS s
SET stage = %(stage)s,
    stage_deadline = least(now() + make_interval(secs => s.stage_seconds),
                           (SELECT r.deadline_at FROM training_rounds AS r WHERE r.id = s.round_id)),
    seed = coalesce(%(seed)s, s.seed), config = coalesce(%(config)s, s.config), updated_at = now()
WHERE s.id = %(session_id)s;

-- name: update_session_failed
-- A session that cannot complete, with the reason.
UPDATE secagg_sessions SET stage = 'failed', failure_reason = %(reason)s, updated_at = now()
WHERE id = %(session_id)s AND stage NOT IN ('completed', 'failed');

-- name: update_session_completed
-- A session whose weighted average is stored.
UPDATE secagg_sessions
SET stage = 'completed', result_key = %(result_key)s, result_sha256 = %(result_sha256)s,
    total_weight = %(total_weight)s, survivors = %(survivors)s, updated_at = now()
WHERE id = %(session_id)s AND stage = 'unmask';

-- name: get_participant_columns
-- A session's devices with their stage-3 counts as one row of arrays (every call reads them: arrays decode in C, rows one by one in Python), byte-wise by device id.
SELECT coalesce(array_agg(device_id ORDER BY device_id COLLATE "C"), '{}') AS device_id,
       coalesce(array_agg(org_id ORDER BY device_id COLLATE "C"), '{}') AS org_id,
       coalesce(array_agg(idx ORDER BY device_id COLLATE "C"), '{}') AS idx,
       coalesce(array_agg(stage ORDER BY device_id COLLATE "C"), '{}') AS stage,
       coalesce(array_agg(holders ORDER BY device_id COLLATE "C"), '{}') AS holders,
       coalesce(array_agg(asked ORDER BY device_id COLLATE "C"), '{}') AS asked,
       coalesce(array_agg(received ORDER BY device_id COLLATE "C"), '{}') AS received
FROM secagg_participants WHERE session_id = %(session_id)s;

-- name: find_participant
-- One device of a session, with its keys.
SELECT device_id, org_id, idx, stage, pk1, pk2
FROM secagg_participants WHERE session_id = %(session_id)s AND device_id = %(device_id)s;

-- name: list_participant_keys
-- The public keys of some devices of a session, by index (a device's neighbours; the survivors at unmasking).
SELECT idx, pk1, pk2 FROM secagg_participants
WHERE session_id = %(session_id)s AND idx = ANY(%(indices)s::int[])
ORDER BY idx;

-- name: find_key_taken
-- Whether another device of the session advertised either key, as pk1 or pk2.
SELECT EXISTS (SELECT 1 FROM secagg_participants
               WHERE session_id = %(session_id)s
                 AND (pk1 IN (%(pk1)s, %(pk2)s) OR pk2 IN (%(pk1)s, %(pk2)s)));

-- name: insert_participant
-- Register one device's stage-0 keys.
INSERT INTO secagg_participants (session_id, device_id, org_id, pk1, pk2)
VALUES (%(session_id)s, %(device_id)s, %(org_id)s, %(pk1)s, %(pk2)s);

-- name: update_participant_indices
-- Give the devices that completed stage 0 their indices 1..n.
UPDATE secagg_participants AS p SET idx = x.idx
FROM unnest(%(device_ids)s::text[], %(indices)s::int[]) AS x (device_id, idx)
WHERE p.session_id = %(session_id)s AND p.device_id = x.device_id;

-- name: update_participant_stage
-- Record the last stage a device completed.
UPDATE secagg_participants SET stage = %(stage)s
WHERE session_id = %(session_id)s AND device_id = %(device_id)s;

-- name: insert_bundles
-- Store one device's stage-1 bundles, one per neighbour.
INSERT INTO secagg_bundles (session_id, sender, receiver, bundle)
SELECT %(session_id)s, %(sender)s, x.receiver, x.bundle
FROM unnest(%(receivers)s::int[], %(bundles)s::bytea[]) AS x (receiver, bundle);

-- name: list_bundles_from_sender
-- The bundles one device handed in (a replay must carry the same ones).
SELECT receiver, bundle FROM secagg_bundles
WHERE session_id = %(session_id)s AND sender = %(sender)s ORDER BY receiver;

-- name: list_bundles_to_receiver
-- The bundles addressed to one device, to forward once stage 1 closed.
SELECT sender, bundle FROM secagg_bundles
WHERE session_id = %(session_id)s AND receiver = %(receiver)s ORDER BY sender;

-- name: insert_vector
-- Record one device's masked vector, stored in S3 under object_key.
INSERT INTO secagg_vectors (session_id, sender, object_key, size_bytes, sha256)
VALUES (%(session_id)s, %(sender)s, %(object_key)s, %(size_bytes)s, %(sha256)s);

-- name: find_vector_sha256
-- The sha256 of the masked vector a device handed in, if any (replays must match it).
SELECT sha256 FROM secagg_vectors WHERE session_id = %(session_id)s AND sender = %(sender)s;

-- name: list_vectors
-- Every masked vector of a session, for unmasking (S3 keys; inline bytes from sessions before 0013).
SELECT sender, data, object_key FROM secagg_vectors WHERE session_id = %(session_id)s ORDER BY sender;

-- name: update_participant_holders
-- At stage 2's close: how many surviving neighbours hold shares of each needed secret.
UPDATE secagg_participants AS p SET holders = x.holders
FROM unnest(%(indices)s::int[], %(holders)s::int[]) AS x (idx, holders)
WHERE p.session_id = %(session_id)s AND p.idx = x.idx;

-- name: update_share_counts
-- One stage-3 answer: each owner it was asked about has one more answer, those it gave a share of one more share.
UPDATE secagg_participants
SET asked = asked + 1, received = received + (idx = ANY(%(given)s::int[]))::int
WHERE session_id = %(session_id)s AND idx = ANY(%(asked)s::int[]);

-- name: insert_shares
-- Store one device's stage-3 answer.
INSERT INTO secagg_shares (session_id, holder, owner, kind, share)
SELECT %(session_id)s, %(holder)s, x.owner, x.kind, x.share
FROM unnest(%(owners)s::int[], %(kinds)s::text[], %(shares)s::bytea[]) AS x (owner, kind, share);

-- name: list_shares_from_holder
-- The shares one device handed in (a replay must carry the same ones).
SELECT holder, owner, kind, share FROM secagg_shares
WHERE session_id = %(session_id)s AND holder = %(holder)s ORDER BY owner;

-- name: list_shares
-- Every share received in a session's stage 3, for reconstruction.
SELECT holder, owner, kind, share FROM secagg_shares
WHERE session_id = %(session_id)s ORDER BY owner, holder;

-- name: find_session_result
-- A secure round's session outcome, with the organizations of its participants and survivors, for training.aggregate.
SELECT s.id, s.stage, s.failure_reason, s.result_key, s.result_sha256, s.total_weight, s.survivors,
       coalesce((SELECT array_agg(p.org_id ORDER BY p.device_id) FROM secagg_participants AS p
                 WHERE p.session_id = s.id AND p.stage IN ('masked_vectors', 'unmask')), '{}') AS survivor_orgs,
       coalesce((SELECT array_agg(p.org_id ORDER BY p.device_id) FROM secagg_participants AS p
                 WHERE p.session_id = s.id), '{}') AS participant_orgs
FROM secagg_sessions AS s WHERE s.round_id = %(round_id)s;

-- name: update_round_due_now
-- A finished session makes its auto-aggregated round due at once (not at the deadline the job waited for).
UPDATE training_rounds SET next_aggregation_at = NULL
WHERE id = %(round_id)s AND auto_aggregate AND state = 'running';
