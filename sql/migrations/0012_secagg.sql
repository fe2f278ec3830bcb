-- SecAgg+ sessions (issue 11, docs/secagg.md): one session per secure round,
-- its participants with their keys and index, the share bundles forwarded
-- between them, the masked vectors and the shares sent back for unmasking.
-- Everything a stage needs lives here, so a restart loses nothing.

CREATE TABLE secagg_sessions (
    id              text PRIMARY KEY,
    round_id        text NOT NULL UNIQUE REFERENCES training_rounds (id),
    stage           text NOT NULL DEFAULT 'setup' CHECK (stage IN
                    ('setup', 'share_keys', 'masked_vectors', 'unmask', 'completed', 'failed')),
    seed            bytea CHECK (seed IS NULL OR length(seed) = 32),
    config          jsonb NOT NULL,
    stage_seconds   integer NOT NULL CHECK (stage_seconds >= 1),
    stage_deadline  timestamptz NOT NULL,
    failure_reason  text,
    result_key      text,
    result_sha256   text,
    total_weight    bigint,
    survivors       integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE secagg_participants (
    session_id   text NOT NULL REFERENCES secagg_sessions (id) ON DELETE CASCADE,
    device_id    text NOT NULL REFERENCES devices (id),
    org_id       text NOT NULL REFERENCES orgs (id),
    idx          integer CHECK (idx IS NULL OR idx >= 1),
    pk1          bytea NOT NULL CHECK (length(pk1) = 32),
    pk2          bytea NOT NULL CHECK (length(pk2) = 32),
    stage        text NOT NULL DEFAULT 'setup' CHECK (stage IN
                 ('setup', 'share_keys', 'masked_vectors', 'unmask')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, device_id),
    CONSTRAINT secagg_participants_pk1_key UNIQUE (session_id, pk1),
    CONSTRAINT secagg_participants_pk2_key UNIQUE (session_id, pk2),
    UNIQUE (session_id, idx)
);

-- Stage 1: one sealed bundle per (sender, receiver), by index.
CREATE TABLE secagg_bundles (
    session_id  text NOT NULL REFERENCES secagg_sessions (id) ON DELETE CASCADE,
    sender      integer NOT NULL,
    receiver    integer NOT NULL,
    bundle      bytea NOT NULL CHECK (length(bundle) = 160),
    PRIMARY KEY (session_id, sender, receiver)
);
CREATE INDEX secagg_bundles_receiver_idx ON secagg_bundles (session_id, receiver);

-- Stage 2: the packed masked vector (inline bytes, or an object key in S3).
CREATE TABLE secagg_vectors (
    session_id  text NOT NULL REFERENCES secagg_sessions (id) ON DELETE CASCADE,
    sender      integer NOT NULL,
    data        bytea,
    object_key  text,
    size_bytes  bigint NOT NULL,
    sha256      text NOT NULL,
    PRIMARY KEY (session_id, sender),
    CHECK ((data IS NULL) <> (object_key IS NULL))
);

-- Stage 3: shares of a secret of `owner` sent by `holder`; kind 'self' (b) or 'key' (sk1).
CREATE TABLE secagg_shares (
    session_id  text NOT NULL REFERENCES secagg_sessions (id) ON DELETE CASCADE,
    holder      integer NOT NULL,
    owner       integer NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('self', 'key')),
    share       bytea NOT NULL CHECK (length(share) = 66),
    PRIMARY KEY (session_id, holder, owner)
);
