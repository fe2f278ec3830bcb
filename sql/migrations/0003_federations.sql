-- Federations of organizations, their members and shared models, and the
-- differential-privacy ledger (one row per charged round).

CREATE TABLE federations (
    id                    text PRIMARY KEY,
    name                  text NOT NULL,
    description           text NOT NULL DEFAULT '',
    owner_org_id          text NOT NULL REFERENCES orgs (id),
    total_epsilon_budget  double precision CHECK (total_epsilon_budget > 0),
    total_delta_budget    double precision CHECK (total_delta_budget > 0 AND total_delta_budget < 1),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((total_epsilon_budget IS NULL) = (total_delta_budget IS NULL))
);
CREATE INDEX federations_owner_idx ON federations (owner_org_id);

-- status: invited -> active. The row id is the invitation's id.
CREATE TABLE federation_members (
    id             text NOT NULL UNIQUE,
    federation_id  text NOT NULL REFERENCES federations (id),
    org_id         text NOT NULL REFERENCES orgs (id),
    status         text NOT NULL CHECK (status IN ('invited', 'active')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    joined_at      timestamptz,
    PRIMARY KEY (federation_id, org_id)
);
CREATE INDEX federation_members_org_idx ON federation_members (org_id, status);

CREATE TABLE federation_models (
    federation_id  text NOT NULL REFERENCES federations (id),
    model_id       text NOT NULL REFERENCES models (id),
    shared_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (federation_id, model_id)
);
CREATE INDEX federation_models_model_idx ON federation_models (model_id);

CREATE TABLE privacy_ledger (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    federation_id       text NOT NULL REFERENCES federations (id),
    round_id            text NOT NULL,
    noise_multiplier    double precision NOT NULL CHECK (noise_multiplier > 0),
    sample_rate         double precision NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    num_steps           integer NOT NULL CHECK (num_steps >= 1),
    round_epsilon_cost  double precision NOT NULL,
    cumulative_epsilon  double precision NOT NULL,
    delta               double precision NOT NULL,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT privacy_ledger_round_key UNIQUE (federation_id, round_id)
);
