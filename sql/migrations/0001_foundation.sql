-- Orgs, credentials, devices, models and their artifacts, uploads, idempotency.
-- Ids are server-generated text with a type prefix; times are timestamptz (UTC).

CREATE TABLE orgs (
    id          text PRIMARY KEY,
    name        text NOT NULL CONSTRAINT orgs_name_key UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs (id),
    name        text NOT NULL,
    token_hash  bytea NOT NULL CONSTRAINT api_keys_token_hash_key UNIQUE,
    prefix      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_org_idx ON api_keys (org_id, created_at DESC);

CREATE TABLE devices (
    id                    text PRIMARY KEY,
    org_id                text NOT NULL REFERENCES orgs (id),
    token_hash            bytea NOT NULL CONSTRAINT devices_token_hash_key UNIQUE,
    platform              text NOT NULL,
    os_version            text NOT NULL,
    model                 text NOT NULL,
    app_version           text NOT NULL,
    battery_pct           integer CHECK (battery_pct BETWEEN 0 AND 100),
    charging              boolean,
    network_type          text,
    available_storage_mb  bigint CHECK (available_storage_mb >= 0),
    reported_state        jsonb NOT NULL DEFAULT '{}',
    registered_at         timestamptz NOT NULL DEFAULT now(),
    last_seen_at          timestamptz NOT NULL DEFAULT now(),
    revoked_at            timestamptz
);
CREATE INDEX devices_org_idx ON devices (org_id, registered_at DESC, id);

CREATE TABLE device_groups (
    id          text PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs (id),
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT device_groups_org_name_key UNIQUE (org_id, name)
);

CREATE TABLE device_group_members (
    group_id   text NOT NULL REFERENCES device_groups (id),
    device_id  text NOT NULL REFERENCES devices (id),
    added_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, device_id)
);
CREATE INDEX device_group_members_device_idx ON device_group_members (device_id);

CREATE TABLE models (
    id          text PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs (id),
    name        text NOT NULL,
    framework   text NOT NULL,
    use_case    text NOT NULL DEFAULT '',
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT models_org_name_key UNIQUE (org_id, name)
);

CREATE TABLE model_versions (
    model_id        text NOT NULL REFERENCES models (id),
    version         integer NOT NULL CHECK (version >= 1),
    parent_version  integer,
    round_id        text,
    strategy        text,
    num_updates     integer NOT NULL DEFAULT 0,
    total_samples   bigint NOT NULL DEFAULT 0,
    metrics         jsonb NOT NULL DEFAULT '{}',
    manifest        jsonb NOT NULL,
    input_shape     jsonb NOT NULL,
    description     text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, version)
);

-- One row per stored object of a version: kind is safetensors | torch | onnx | program.
CREATE TABLE model_artifacts (
    model_id    text NOT NULL,
    version     integer NOT NULL,
    kind        text NOT NULL,
    object_key  text NOT NULL,
    sha256      text NOT NULL,
    size_bytes  bigint NOT NULL,
    PRIMARY KEY (model_id, version, kind),
    FOREIGN KEY (model_id, version) REFERENCES model_versions (model_id, version)
);

-- Presigned PUT uploads: declared size and sha256 are checked when the upload is used.
CREATE TABLE uploads (
    id          text PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs (id),
    device_id   text REFERENCES devices (id),
    object_key  text NOT NULL,
    size_bytes  bigint NOT NULL CHECK (size_bytes > 0),
    sha256      text NOT NULL,
    purpose     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    consumed_at timestamptz
);

-- A mutating call with an idempotency_key: claimed before the handler runs,
-- completed with the encoded result, or released when the handler fails.
CREATE TABLE idempotency_keys (
    scope        text NOT NULL,
    method       text NOT NULL,
    key          text NOT NULL,
    params_hash  bytea NOT NULL,
    result       bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, method, key)
);

-- A version with its artifacts' digests (not their object keys), as the API shows it.
CREATE VIEW model_version_details AS
SELECT v.model_id, v.version, v.parent_version, v.round_id, v.strategy, v.num_updates,
       v.total_samples, v.metrics, v.manifest, v.input_shape, v.description, v.created_at,
       coalesce((SELECT json_agg(json_build_object('kind', a.kind, 'sha256', a.sha256,
                                                   'size_bytes', a.size_bytes) ORDER BY a.kind)
                 FROM model_artifacts AS a
                 WHERE a.model_id = v.model_id AND a.version = v.version), '[]'::json) AS artifacts
FROM model_versions AS v;
