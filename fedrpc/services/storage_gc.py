"""The storage collector: what is deleted from S3 and Postgres, when, and by whom.

The invariant (docs/design.md, "Storage: objects and rows together"): a row
that owns an object is written only after the object exists, under a fresh
key; it is deleted, or stops naming its object, before the object is deleted,
in a transaction that records the key in ``doomed_objects``. So a crash
between object and row leaves an object no row names (an orphan), and a crash
between row and object leaves a record to finish; never a row that names a
missing object. The view ``stored_object_refs`` (migration 0016) lists every
column that owns an object.

One pass (``collect``), bounded by ``storage_gc_batch``, safe in several
processes at once (each step claims its work in Postgres):

1. upload rows that expired unused ``storage_gc_grace_seconds`` ago, or were
   used ``used_upload_keep_seconds`` ago (a replayed call still finds them),
   are deleted and their keys doomed (``FOR UPDATE SKIP LOCKED``);
2. the raw bytes of device updates, and of SecAgg+ masked vectors, of rounds
   that ended ``update_retention_seconds`` ago are purged: the rows stay as
   tombstones (counts, sizes, sha256, metrics), ``data`` is dropped and the
   objects doomed;
3. the orphan sweep (one process at a time, under a lease) lists the next
   batch of the bucket in key order and dooms, for deletion a grace period
   later, the objects under our prefixes that are older than the grace period
   and named by no row: objects of calls that failed or crashed before their
   row, optimiser states and personalized weights no row names any more,
   used uploads written again;
4. due doomed keys are leased to this process, checked again (a key a row
   names again is forgotten, never deleted), deleted from S3 in batches and
   forgotten. A process that dies leaves its lease to run out.

Writers use a fresh key per object (SecAgg+ masked vectors and session
results included), so an orphan cannot become named again; the check in step
4 guards against a writer that would break that rule. A failed call deletes
what it wrote only if no row names it (``delete_unnamed``): its transaction
may have committed before the failure reached it.
"""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass
from datetime import datetime

import msgspec

from fedrpc.db import Database
from fedrpc.settings import Settings
from fedrpc.storage import Storage

__all__ = ["PREFIXES", "Collected", "collect", "delete_doomed", "delete_unnamed", "sweep_orphans"]

log = logging.getLogger("fedrpc.services.storage_gc")

# What the server writes; anything else in the bucket is left alone.
PREFIXES = ("models/", "personalized/", "secagg/", "updates/", "uploads/")
# How long a process may hold the sweep or a doomed key before another takes it over.
LEASE_SECONDS = 300
# Ended rounds whose updates one pass purges (at most storage_gc_batch updates in all).
ROUNDS_PER_PASS = 10


class _SweepLease(msgspec.Struct):
    after: str
    leased_until: datetime


class _Purged(msgspec.Struct):
    updates: int
    vectors: int
    rounds: int


@dataclass(frozen=True, slots=True)
class Collected:
    """What one pass did: rows deleted or purged, objects doomed and deleted."""

    uploads: int = 0
    updates: int = 0
    vectors: int = 0
    orphans: int = 0
    deleted: int = 0


async def delete_unnamed(db: Database, storage: Storage, keys: list[str]) -> None:
    """A failed call's cleanup: delete the objects it wrote that no row names.

    The failure may have reached the call after its transaction committed (a reply lost
    on the way back): the rows then name the objects and they stay. When the names cannot
    be read, nothing is deleted; the sweep takes the orphans a grace period later.
    """
    if not keys:
        return
    try:
        named = set(await db.column("storage_gc.find_named_keys", keys=keys))
    except Exception:
        log.warning("could not check %d objects of a failed call; the sweep will", len(keys))
        return
    await storage.delete_quietly([key for key in keys if key not in named])


async def collect(
    db: Database, storage: Storage, settings: Settings, *, used_upload_keep_seconds: int
) -> Collected:
    """One pass of the collector (see the module notes)."""
    batch = settings.storage_gc_batch
    uploads = await db.value(
        "storage_gc.delete_stale_uploads",
        grace_seconds=settings.storage_gc_grace_seconds,
        used_keep_seconds=used_upload_keep_seconds,
        limit=batch,
    )
    purged = await db.get(
        "storage_gc.update_expired_updates_to_tombstones",
        _Purged,
        retention_seconds=settings.update_retention_seconds,
        max_rounds=ROUNDS_PER_PASS,
        limit=batch,
    )
    try:
        orphans = await sweep_orphans(db, storage, batch, settings.storage_gc_grace_seconds)
    except Exception:
        # Listing the bucket may fail (storage down, credentials without ListBucket): the
        # objects already doomed are still deleted.
        log.warning("the orphan sweep failed; doomed objects are still deleted", exc_info=True)
        orphans = 0
    deleted = await delete_doomed(db, storage, batch)
    done = Collected(uploads, purged.updates, purged.vectors, orphans, deleted)
    if done != Collected():
        log.info(
            "storage: %d upload rows, %d updates and %d masked vectors purged, "
            "%d orphans found, %d objects deleted",
            *astuple(done),
        )
    return done


async def sweep_orphans(db: Database, storage: Storage, batch: int, grace_seconds: int) -> int:
    """Doom the orphans among the next ``batch`` objects of the bucket; how many were found.

    Nothing happens while another process holds the sweep; a process that fails
    mid-batch leaves its lease to run out and the batch is listed again."""
    lease = await db.maybe("storage_gc.claim_sweep", _SweepLease, lease_seconds=LEASE_SECONDS)
    if lease is None:
        return 0
    listed = await storage.list_after(lease.after, batch)
    ours = [o for o in listed if o.key.startswith(PREFIXES)]
    found = 0
    if ours:
        found = await db.run(
            "storage_gc.insert_orphans",
            keys=[o.key for o in ours],
            modified=[o.last_modified for o in ours],
            grace_seconds=grace_seconds,
        )
    # A short batch was the end of the bucket: the next one starts over.
    after = listed[-1].key if len(listed) == batch else ""
    if not await db.run("storage_gc.update_sweep", after=after, leased_until=lease.leased_until):
        log.warning("the orphan sweep's lease ran out before its batch was done")
    return found


async def delete_doomed(db: Database, storage: Storage, batch: int) -> int:
    """Delete up to ``batch`` due doomed objects; how many are gone. A key S3 refused stays
    doomed and is taken up again once this process's lease ran out; when S3 could not be
    reached at all, the keys are given back at once for the next pass."""
    keys = await db.column(
        "storage_gc.claim_doomed_objects", limit=batch, lease_seconds=LEASE_SECONDS
    )
    if not keys:
        return 0
    try:
        deleted = await storage.delete_many(keys)
    except Exception:
        await db.run("storage_gc.release_doomed_objects", keys=keys)
        raise
    await db.run("storage_gc.delete_doomed_objects", keys=deleted)
    return len(deleted)
