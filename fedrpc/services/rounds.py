"""Round state changes: one conditional UPDATE each, so a transition is atomic.

An illegal transition is ``precondition_failed`` with the round's current
state in ``data.state``. An aggregation holds its round by a :class:`Claim`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from fedrpc.auth import new_id
from fedrpc.db import Database, jsonb
from fedrpc.errors import Conflict, NotFound, PreconditionFailed
from schemas.training import CreateRoundParams

log = logging.getLogger("fedrpc.services.rounds")


async def transition(
    db: Database, query: str, round_id: str, allowed: tuple[str, ...], **params
) -> None:
    """Run the UPDATE ``query`` (guarded by its own WHERE state IN ...) or explain why it did nothing."""
    if await db.run(query, round_id=round_id, **params):
        return
    state = await db.value("training.find_round_state", round_id=round_id)
    if state is None:
        raise NotFound("no round with this id")
    raise PreconditionFailed(
        f"the round is {state}; this needs it to be {' or '.join(allowed)}",
        state=state,
        allowed=list(allowed),
    )


async def insert_round(db: Database, org_id: str, p: CreateRoundParams, min_updates: int) -> str:
    """Store a new pending round of ``org_id`` (its rules already checked); returns its id."""
    return await db.value(
        "training.insert_round",
        id=new_id("rnd"),
        org_id=org_id,
        model_id=p.model_id,
        base_version=p.base_version,
        federation_id=p.federation_id,
        target_device_count=p.target_device_count,
        min_updates=min_updates,
        deadline_seconds=p.deadline_seconds,
        update_format=p.update_format,
        strategy=p.strategy.name,
        strategy_params=jsonb(p.strategy.params),
        client_config=jsonb(p.client_config),
        dp_config=jsonb(p.differential_privacy) if p.differential_privacy else None,
        secagg_config=jsonb(p.secure_aggregation) if p.secure_aggregation else None,
        auto_aggregate=p.auto_aggregate,
        max_sample_count=p.max_sample_count,
        max_update_norm=p.max_update_norm,
    )


class ClaimLost(Conflict):
    """The round is no longer this aggregation's: it was cancelled, or another aggregation
    took it over after this one's lease ran out. Nothing of this aggregation is published."""


class Claim:
    """One aggregation's hold on its round (running -> aggregating, docs/aggregation.md).

    The claim is a random token and a lease on the database clock; :meth:`renewed`
    extends the lease every third of its length while the aggregation works, and a
    round whose lease ran out may be claimed by another aggregation. Every UPDATE
    that renews or ends the claim is guarded by the token (``WHERE aggregation_claim =
    ours``) and checks its row count: none means the round is no longer ours
    (cancelled, or taken over) and the aggregation stops with :class:`ClaimLost`.
    """

    def __init__(self, db: Database, round_id: str, lease_seconds: float) -> None:
        self.db, self.round_id, self.lease_seconds = db, round_id, lease_seconds
        self.token = secrets.token_hex(16)
        self.lost = False  # set by a guarded UPDATE that touched no row; read by worker threads

    async def take(self) -> None:
        """Claim the round, or say why not (another aggregation holds it, or it is not running)."""
        if await self.db.value(
            "training.aggregate.claim_round_for_aggregation",
            round_id=self.round_id,
            claim=self.token,
            lease_seconds=self.lease_seconds,
        ):
            return
        state = await self.db.value("training.find_round_state", round_id=self.round_id)
        if state is None:
            raise NotFound("no round with this id")
        if state == "aggregating":
            raise Conflict("the round is being aggregated by another call", state=state)
        raise PreconditionFailed(
            f"the round is {state}; aggregation needs it running", state=state, allowed=["running"]
        )

    def check(self) -> None:
        """Raise ClaimLost once a guarded UPDATE found the round no longer ours (any thread)."""
        if self.lost:
            raise ClaimLost("the round is no longer held by this aggregation")

    async def renew(self) -> None:
        """Extend the lease now; ClaimLost if the round is no longer ours."""
        await self._guarded(
            self.db,
            "training.aggregate.update_aggregation_lease",
            lease_seconds=self.lease_seconds,
        )

    async def complete(self, tx: Database, version: int) -> None:
        """aggregating -> completed with ``version``, inside the version's transaction."""
        await self._guarded(tx, "training.aggregate.update_round_completed", version=version)

    async def fail(self, reason: str) -> None:
        """aggregating -> failed with ``reason``."""
        await self._guarded(self.db, "training.aggregate.update_round_failed", reason=reason)

    async def release(self) -> None:
        """aggregating -> running, for a failure that may pass; nothing if the round is not ours."""
        if not await self.db.run(
            "training.aggregate.update_round_running_again",
            round_id=self.round_id,
            claim=self.token,
        ):
            self.lost = True

    async def _guarded(self, db: Database, query: str, **params) -> None:
        if not await db.run(query, round_id=self.round_id, claim=self.token, **params):
            self.lost = True
            raise await self.lost_error(db)

    async def lost_error(self, db: Database | None = None) -> ClaimLost:
        """Why the round is no longer ours, in the words the caller sees."""
        state = await (db or self.db).value("training.find_round_state", round_id=self.round_id)
        if state == "cancelled":
            return ClaimLost(
                "the round was cancelled while it was being aggregated; nothing was published",
                state=state,
            )
        return ClaimLost(
            "another aggregation took the round over after this one's lease ran out; "
            "this one published nothing",
            state=state,
        )

    @contextlib.asynccontextmanager
    async def renewed(self) -> AsyncIterator[Claim]:
        """Keep the lease alive while the body runs (every third of the lease)."""
        stop = asyncio.Event()
        renewer = asyncio.create_task(self._renew_until(stop))
        try:
            yield self
        finally:
            stop.set()
            await renewer

    async def _renew_until(self, stop: asyncio.Event) -> None:
        while not self.lost:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease_seconds / 3)
            if stop.is_set():
                return
            try:
                await self.renew()
            except ClaimLost:
                if not stop.is_set():  # (not merely completed by this aggregation meanwhile)
                    log.info("round %s is no longer this aggregation's; it stops", self.round_id)
            except Exception:
                # The guarded updates still protect the round; the next renewal may succeed.
                log.warning("renewing the aggregation lease of round %s failed", self.round_id)
