-- name: lock_budget
-- The federation's budget, locked so charges to it are serialized.
SELECT id, total_epsilon_budget, total_delta_budget FROM federations
WHERE id = %(federation_id)s FOR UPDATE;

-- name: update_budget
-- Set the budget; a null delta keeps the current one (or the default); the ledger is never touched.
UPDATE federations
SET total_epsilon_budget = %(total_epsilon_budget)s,
    total_delta_budget = COALESCE(%(total_delta_budget)s, total_delta_budget, %(default_delta)s),
    updated_at = now()
WHERE id = %(federation_id)s;

-- name: list_charges
-- A federation's charged steps per (noise, rate) pair, first charged first, and their rounds.
-- Steps of equal pairs compose as one self-composition, so the accountant gets one row per pair.
SELECT noise_multiplier, sample_rate, sum(num_steps) AS num_steps, count(*) AS rounds
FROM privacy_ledger WHERE federation_id = %(federation_id)s
GROUP BY noise_multiplier, sample_rate ORDER BY min(id);

-- name: insert_charge
-- Record a charged round with its own cost and the composed epsilon after it.
INSERT INTO privacy_ledger (federation_id, round_id, noise_multiplier, sample_rate, num_steps,
                            round_epsilon_cost, cumulative_epsilon, delta)
VALUES (%(federation_id)s, %(round_id)s, %(noise_multiplier)s, %(sample_rate)s, %(num_steps)s,
        %(round_epsilon_cost)s, %(cumulative_epsilon)s, %(delta)s)
RETURNING round_id, noise_multiplier, sample_rate, num_steps, round_epsilon_cost, cumulative_epsilon,
          delta, recorded_at;

-- name: list_ledger
-- The ledger page by page, oldest first.
SELECT round_id, noise_multiplier, sample_rate, num_steps, round_epsilon_cost, cumulative_epsilon,
       delta, recorded_at
FROM privacy_ledger WHERE federation_id = %(federation_id)s
ORDER BY id LIMIT %(limit)s OFFSET %(offset)s;

-- name: count_ledger
-- How many rounds were charged.
SELECT count(*) FROM privacy_ledger WHERE federation_id = %(federation_id)s;
