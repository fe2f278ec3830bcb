-- Device jobs and personalized state: the constraints and indexes their methods rely on.

-- One live job per (round, device): a device may open another only after its job failed.
CREATE UNIQUE INDEX device_jobs_round_device_key ON device_jobs (round_id, device_id)
    WHERE round_id IS NOT NULL AND state <> 'failed';

-- Bounded text and the shape of the stored maps (the API checks them too; this keeps other writers honest).
ALTER TABLE device_jobs
    ADD CONSTRAINT device_jobs_last_error_length CHECK (char_length(last_error) <= 2000),
    ADD CONSTRAINT device_jobs_progress_object CHECK (jsonb_typeof(progress) = 'object'),
    ADD CONSTRAINT device_jobs_completed_at CHECK ((state = 'completed') = (completed_at IS NOT NULL));

-- A state either has weights (key, digest and size together) or none.
ALTER TABLE personalized_states
    ADD CONSTRAINT personalized_states_weights_complete CHECK (
        (weights_key IS NULL) = (weights_sha256 IS NULL) AND (weights_key IS NULL) = (weights_size_bytes IS NULL)),
    ADD CONSTRAINT personalized_states_metrics_object CHECK (jsonb_typeof(metrics) = 'object'),
    ADD CONSTRAINT personalized_states_head_layers_array CHECK (jsonb_typeof(head_layers) = 'array');

-- training.personalized.list: the states of one federation (and model), newest per device.
CREATE INDEX personalized_states_federation_idx
    ON personalized_states (federation_id, model_id, device_id, updated_at DESC);
