-- Training rounds, the devices selected for them, on-device jobs, weight
-- updates and personalized state.

CREATE TABLE training_rounds (
    id                  text PRIMARY KEY,
    org_id              text NOT NULL REFERENCES orgs (id),
    model_id            text NOT NULL,
    base_version        integer NOT NULL,
    federation_id       text REFERENCES federations (id),
    state               text NOT NULL DEFAULT 'pending' CHECK (state IN
                        ('pending', 'selected', 'running', 'aggregating', 'completed', 'cancelled', 'failed')),
    target_device_count integer NOT NULL CHECK (target_device_count >= 1),
    min_updates         integer NOT NULL CHECK (min_updates >= 1),
    deadline_seconds    integer NOT NULL CHECK (deadline_seconds >= 1),
    update_format       text NOT NULL CHECK (update_format IN ('delta', 'weights')),
    strategy            text NOT NULL,
    strategy_params     jsonb NOT NULL DEFAULT '{}',
    client_config       jsonb NOT NULL DEFAULT '{}',
    dp_config           jsonb,
    secagg_config       jsonb,
    auto_aggregate      boolean NOT NULL DEFAULT false,
    selection_seed      bigint,
    selection_criteria  jsonb,
    eligible_count      integer,
    started_at          timestamptz,
    deadline_at         timestamptz,
    finished_at         timestamptz,
    cancel_reason       text,
    failure_reason      text,
    result_version      integer,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (model_id, base_version) REFERENCES model_versions (model_id, version)
);
CREATE INDEX training_rounds_org_idx ON training_rounds (org_id, created_at DESC);
CREATE INDEX training_rounds_federation_idx ON training_rounds (federation_id, created_at DESC);
CREATE INDEX training_rounds_running_idx ON training_rounds (deadline_at) WHERE state = 'running';

CREATE TABLE round_devices (
    round_id     text NOT NULL REFERENCES training_rounds (id),
    device_id    text NOT NULL REFERENCES devices (id),
    selected_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (round_id, device_id)
);
CREATE INDEX round_devices_device_idx ON round_devices (device_id);

CREATE TABLE device_jobs (
    id            text PRIMARY KEY,
    device_id     text NOT NULL REFERENCES devices (id),
    job_type      text NOT NULL CHECK (job_type IN ('federated', 'personalization')),
    round_id      text REFERENCES training_rounds (id),
    model_id      text NOT NULL REFERENCES models (id),
    base_version  integer NOT NULL,
    state         text NOT NULL DEFAULT 'queued' CHECK (state IN
                  ('queued', 'downloading', 'training', 'uploading', 'completed', 'failed')),
    progress      jsonb NOT NULL DEFAULT '{}',
    last_error    text,
    metrics       jsonb,
    adapter_key   text,
    adapter_sha256 text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz
);
CREATE INDEX device_jobs_device_idx ON device_jobs (device_id, created_at DESC);

-- One accepted update per (round, device); its bytes live at object_key.
CREATE TABLE training_updates (
    id             text PRIMARY KEY,
    round_id       text NOT NULL REFERENCES training_rounds (id),
    device_id      text NOT NULL REFERENCES devices (id),
    org_id         text NOT NULL REFERENCES orgs (id),
    model_id       text NOT NULL REFERENCES models (id),
    version        integer NOT NULL,
    sample_count   bigint NOT NULL CHECK (sample_count >= 1),
    update_format  text NOT NULL CHECK (update_format IN ('delta', 'weights')),
    encoding       text NOT NULL CHECK (encoding IN ('safetensors', 'torch')),
    object_key     text NOT NULL,
    sha256         text NOT NULL,
    size_bytes     bigint NOT NULL,
    metrics        jsonb NOT NULL DEFAULT '{}',
    loss           double precision,
    accuracy       double precision,
    received_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT training_updates_round_device_key UNIQUE (round_id, device_id)
);
CREATE INDEX training_updates_model_idx ON training_updates (model_id, version, received_at DESC);
CREATE INDEX training_updates_org_idx ON training_updates (org_id);

-- Personalized state per (device, model, federation); federation_id '' means none.
CREATE TABLE personalized_states (
    device_id             text NOT NULL REFERENCES devices (id),
    model_id              text NOT NULL REFERENCES models (id),
    federation_id         text NOT NULL DEFAULT '',
    personalization_type  text NOT NULL CHECK (personalization_type IN ('ditto', 'fedper', 'local_finetune')),
    weights_key           text,
    weights_sha256        text,
    weights_size_bytes    bigint,
    metrics               jsonb NOT NULL DEFAULT '{}',
    head_layers           jsonb NOT NULL DEFAULT '[]',
    round_number          integer,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, model_id, federation_id)
);

-- Dotted numeric versions compared component by component, missing ones as 0
-- ("1.9" = "1.9.0" < "1.9.3" < "1.10"); anything else has no key (NULL).
CREATE FUNCTION app_version_key(v text) RETURNS integer[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN v ~ '^\d{1,9}(\.\d{1,9}){0,3}$' THEN
        string_to_array(v, '.')::integer[]
        || array_fill(0, ARRAY[4 - cardinality(string_to_array(v, '.'))])
    END
$$;
