-- Auto-aggregation that one tenant cannot stall (issue 10).
--
-- The background job leases each round it takes up to its pass through
-- next_aggregation_at and counts the attempt; a round that was not aggregated
-- for a reason that may pass is tried again at next_aggregation_at (exponential
-- back-off), with the reason in last_aggregation_error, and fails after the
-- maximum number of attempts (see docs/aggregation.md).
ALTER TABLE training_rounds
    ADD COLUMN aggregation_attempts integer NOT NULL DEFAULT 0 CHECK (aggregation_attempts >= 0),
    ADD COLUMN next_aggregation_at timestamptz,
    ADD COLUMN last_aggregation_error text;

-- The due list reads only the auto rounds still in play.
CREATE INDEX training_rounds_auto_idx ON training_rounds (org_id)
    WHERE auto_aggregate AND state IN ('running', 'aggregating');
