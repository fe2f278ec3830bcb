-- Aggregation: a lease on the round while it aggregates (so a crashed worker's
-- round can be taken over) and the server optimiser state of each model.

ALTER TABLE training_rounds ADD COLUMN aggregation_started_at timestamptz;

CREATE TABLE model_server_state (
    model_id    text PRIMARY KEY REFERENCES models (id),
    strategy    text NOT NULL,
    version     integer NOT NULL,
    object_key  text NOT NULL,
    sha256      text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
