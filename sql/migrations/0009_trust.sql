-- Trust between organizations and devices (issue 10).
--
-- A federation round's result mixes at least min_round_updates updates
-- (the owner sets it; 2 is the floor so a result is never one update).
ALTER TABLE federations
    ADD COLUMN min_round_updates integer NOT NULL DEFAULT 10
        CHECK (min_round_updates BETWEEN 2 AND 100000);

-- What a device may claim and send in a round: sample_count weights are
-- capped at max_sample_count; with max_update_norm each update's L2 norm
-- (of its delta) is bounded. How the devices were selected is recorded with
-- the rate the privacy accountant is charged: 'uniform', 'stratified' or
-- 'poisson' (DP rounds: each eligible device independently with sample_rate).
ALTER TABLE training_rounds
    ADD COLUMN max_sample_count integer NOT NULL DEFAULT 10000 CHECK (max_sample_count >= 1),
    ADD COLUMN max_update_norm double precision CHECK (max_update_norm > 0),
    ADD COLUMN selection_method text CHECK (selection_method IN ('uniform', 'stratified', 'poisson')),
    ADD COLUMN sample_rate double precision CHECK (sample_rate > 0 AND sample_rate <= 1);
