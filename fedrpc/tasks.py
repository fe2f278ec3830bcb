"""Periodic housekeeping that runs inside the server process.

Every job is idempotent and claims its work in Postgres, so running several
server processes (or restarting one) is safe.
"""

from __future__ import annotations

import asyncio
import logging

from fedrpc.context import Services
from fedrpc.errors import AppError, PreconditionFailed
from fedrpc.services.round_aggregation import LEASE_SECONDS, aggregate_round

log = logging.getLogger("fedrpc.tasks")

IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600


async def purge_idempotency_keys(services: Services) -> None:
    await services.db.run(
        "idempotency.delete_expired_keys", max_age_seconds=IDEMPOTENCY_WINDOW_SECONDS
    )


async def aggregate_due_rounds(services: Services) -> None:
    """Rounds with auto_aggregate: aggregate when all selected devices have uploaded or the
    deadline passed; fail them at the deadline when they have too few updates."""
    for round_id in await services.db.column(
        "training.aggregate.list_rounds_due", lease_seconds=LEASE_SECONDS
    ):
        try:
            await aggregate_round(services.db, services.storage, round_id)
        except PreconditionFailed as exc:
            if exc.details.get("received") is not None:  # too few updates
                await services.db.run(
                    "training.aggregate.update_round_failed_if_expired",
                    round_id=round_id,
                    reason=exc.message,
                )
        except AppError:
            log.info("round %s was not aggregated automatically", round_id, exc_info=True)


JOBS = (purge_idempotency_keys, aggregate_due_rounds)


async def run_periodically(services: Services, interval_seconds: float) -> None:
    """Run every job, then sleep; a failing job is logged and retried next time."""
    while True:
        for job in JOBS:
            try:
                await job(services)
            except Exception:
                log.exception("background job %s failed", job.__name__)
        await asyncio.sleep(interval_seconds)
