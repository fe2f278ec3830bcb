-- Aggregation claims and optimiser lineages (issue 14, docs/aggregation.md).
--
-- An aggregation holds its round by a random claim token and a lease on the
-- database clock that it renews while it works; every UPDATE that renews or
-- ends the claim is guarded by the token, so an aggregation whose round was
-- cancelled or taken over (after its lease ran out) changes nothing.
ALTER TABLE training_rounds
    ADD COLUMN aggregation_claim text,
    ADD COLUMN aggregation_lease_until timestamptz;

-- A round being aggregated now keeps the lease it had: 10 minutes from its start.
UPDATE training_rounds
SET aggregation_claim = 'before-0017',
    aggregation_lease_until = coalesce(aggregation_started_at, now()) + interval '10 minutes'
WHERE state = 'aggregating';

-- Exactly the rounds being aggregated hold a claim.
ALTER TABLE training_rounds ADD CONSTRAINT training_rounds_aggregation_claim_check
    CHECK ((state = 'aggregating') = (aggregation_claim IS NOT NULL AND aggregation_lease_until IS NOT NULL));

-- Server optimiser state (FedAvgM momentum, FedAdagrad/FedAdam/FedYogi m and v)
-- belongs to a lineage, not to a model: the state computed with version v
-- (from its parent) is what a round trained from v continues with. Two rounds
-- from one version each start from that version's state and never see each
-- other's. One row per version that a server optimiser made; the one row per
-- model kept so far is the state of the version it names.
DELETE FROM model_server_state AS s
WHERE NOT EXISTS (SELECT 1 FROM model_versions AS v WHERE v.model_id = s.model_id AND v.version = s.version);
ALTER TABLE model_server_state DROP CONSTRAINT model_server_state_pkey;
ALTER TABLE model_server_state ADD COLUMN parent_version integer;
UPDATE model_server_state AS s SET parent_version = v.parent_version
FROM model_versions AS v WHERE v.model_id = s.model_id AND v.version = s.version;
ALTER TABLE model_server_state
    ADD PRIMARY KEY (model_id, version),
    ADD FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version);
