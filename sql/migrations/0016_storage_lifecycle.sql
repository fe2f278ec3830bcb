-- Storage lifecycle (issue 14, docs/design.md "Storage: objects and rows together").
--
-- The invariant: a row that owns an object is written only after the object
-- exists (under a fresh key), and is removed, or stops naming its object,
-- before the object is deleted. Every column that owns an object is listed in
-- the view stored_object_refs; an object under one of our prefixes that no row
-- names is an orphan (a call that failed or crashed between its object and its
-- row, a replaced optimiser state) which the collector deletes after a grace
-- period. A row is never deleted before its object without leaving a record
-- of the object in doomed_objects in the same transaction, so a crash between
-- the two leaves work to finish, never an object nobody knows of.

-- Objects to delete. reason: 'upload' (an upload row that expired or was used
-- a day ago), 'update' (raw device bytes past their retention), 'orphan' (no
-- row names it). A doomed key is deleted from not_before on, by the process
-- that claimed it (claimed_until is its lease), and only if no row names it
-- again by then.
CREATE TABLE doomed_objects (
    object_key     text PRIMARY KEY,
    reason         text NOT NULL CHECK (reason IN ('upload', 'update', 'orphan')),
    doomed_at      timestamptz NOT NULL DEFAULT now(),
    not_before     timestamptz NOT NULL DEFAULT now(),
    claimed_until  timestamptz,
    attempts       integer NOT NULL DEFAULT 0 CHECK (attempts >= 0)
);
CREATE INDEX doomed_objects_due_idx ON doomed_objects (not_before);

-- The orphan sweep walks the bucket in key order, a bounded batch per pass,
-- one process at a time (leased_until), from `after` on; '' starts over.
CREATE TABLE storage_sweep (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    after         text NOT NULL DEFAULT '',
    leased_until  timestamptz,
    rounds        bigint NOT NULL DEFAULT 0
);
INSERT INTO storage_sweep DEFAULT VALUES;

-- Raw device updates are kept FEDRPC_UPDATE_RETENTION_SECONDS after their round
-- ended (7 days by default), then purged: the row stays as a tombstone (counts,
-- sizes, sha256, metrics) with its bytes gone (data NULL, its object deleted)
-- and purged_at set. object_key stays the update's name, as for the updates
-- kept in their rows (migration 0015). The same holds for a SecAgg+ session's
-- masked vectors. A round whose updates were all purged is marked.
ALTER TABLE training_updates ADD COLUMN purged_at timestamptz;
ALTER TABLE secagg_vectors
    ADD COLUMN purged_at timestamptz,
    DROP CONSTRAINT secagg_vectors_check,
    ADD CONSTRAINT secagg_vectors_bytes CHECK (
        purged_at IS NOT NULL OR ((data IS NULL) <> (object_key IS NULL))),
    ADD CONSTRAINT secagg_vectors_purged CHECK (purged_at IS NULL OR data IS NULL);
ALTER TABLE training_updates
    ADD CONSTRAINT training_updates_purged CHECK (purged_at IS NULL OR data IS NULL);
ALTER TABLE training_rounds ADD COLUMN updates_purged_at timestamptz;
CREATE INDEX training_rounds_unpurged_idx ON training_rounds (finished_at)
    WHERE updates_purged_at IS NULL AND state IN ('completed', 'failed', 'cancelled');

-- Uploads past their expiry, in order.
CREATE INDEX uploads_expires_idx ON uploads (expires_at);

-- Every object a row owns. A migration that adds a column naming an object
-- must replace this view (tests/methods/test_storage_lifecycle.py checks that
-- every *_key column but device_jobs.adapter_key, a record of which object a
-- job produced, is in it). uploads rows reserve their key: the object may
-- not exist yet, or be gone once the upload was used.
CREATE VIEW stored_object_refs AS
SELECT object_key FROM uploads
UNION ALL
SELECT object_key FROM model_artifacts
UNION ALL
SELECT object_key FROM model_server_state
UNION ALL
SELECT object_key FROM training_updates WHERE data IS NULL AND purged_at IS NULL
UNION ALL
SELECT object_key FROM secagg_vectors WHERE object_key IS NOT NULL AND purged_at IS NULL
UNION ALL
SELECT result_key FROM secagg_sessions WHERE result_key IS NOT NULL
UNION ALL
SELECT weights_key FROM personalized_states WHERE weights_key IS NOT NULL;

-- So that "does a row name this key" is an index lookup in every branch.
CREATE INDEX uploads_object_key_idx ON uploads (object_key);
CREATE INDEX model_artifacts_object_key_idx ON model_artifacts (object_key);
CREATE INDEX model_server_state_object_key_idx ON model_server_state (object_key);
CREATE INDEX training_updates_object_key_idx ON training_updates (object_key)
    WHERE data IS NULL AND purged_at IS NULL;
CREATE INDEX secagg_vectors_object_key_idx ON secagg_vectors (object_key)
    WHERE object_key IS NOT NULL AND purged_at IS NULL;
CREATE INDEX secagg_sessions_result_key_idx ON secagg_sessions (result_key)
    WHERE result_key IS NOT NULL;
CREATE INDEX personalized_states_weights_key_idx ON personalized_states (weights_key)
    WHERE weights_key IS NOT NULL;
