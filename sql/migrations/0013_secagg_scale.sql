-- SecAgg+ at cohort scale (issue 11): what a stage call needs is counted per
-- participant, so a call reads n small rows instead of every share, and the
-- masked vectors live in S3 (secagg_vectors.object_key) instead of bytea.

-- Stage 3, per owner of a needed secret (its self-mask secret if it survived
-- stage 2, its mask key if it dropped there): `holders` is how many of its
-- neighbours survived stage 2 (set when stage 2 closes), `asked` how many of
-- them have answered stage 3, `received` how many shares of it arrived. The
-- secret can still be rebuilt while received + (holders - asked) >= t.
ALTER TABLE secagg_participants
    ADD COLUMN holders  integer NOT NULL DEFAULT 0 CHECK (holders >= 0),
    ADD COLUMN asked    integer NOT NULL DEFAULT 0 CHECK (asked >= 0),
    ADD COLUMN received integer NOT NULL DEFAULT 0 CHECK (received >= 0);
