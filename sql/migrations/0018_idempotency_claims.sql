-- Idempotency records, hardened (issue 14):
-- * a claim is owned by the call that made it: `claim` is a random value only that
--   call knows, and completing or releasing a record requires it, so a call whose
--   claim was taken over (it ran past the ten-minute stale limit) cannot overwrite
--   the new owner's record;
-- * the scope is the principal (one API key, one device), not the organization;
-- * neither the key nor the result is stored in plaintext: `key_hash` is sha256 of
--   the key and `sealed_result` is the result encrypted under a key derived from the
--   idempotency key itself, so rows alone do not reveal a token that a replay of
--   devices.register or orgs.api_keys.create returns (docs/design.md, Idempotency).
-- Records live 24 hours; dropping the old ones only forgets replays in flight.
DROP TABLE idempotency_keys;

CREATE TABLE idempotency_keys (
    scope          text NOT NULL,
    method         text NOT NULL,
    key_hash       bytea NOT NULL,
    params_hash    bytea NOT NULL,
    claim          bytea NOT NULL,
    sealed_result  bytea,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, method, key_hash)
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
