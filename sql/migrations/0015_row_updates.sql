-- Small device updates live in their row (issue 13: a cross-device round of a small
-- model spent most of its server CPU on one S3 write and one S3 read per update).
-- An update of at most FEDRPC_ROW_UPDATE_MAX_BYTES (default 64 KiB) keeps its
-- bytes in `data`; object_key stays its name (device jobs refer to it) but no
-- object is written. Larger updates keep data NULL and live in S3 as before.
ALTER TABLE training_updates ADD COLUMN data bytea;
