"""Periodic housekeeping that runs inside the server process.

Every job is idempotent and claims its work in Postgres, so running several
server processes (or restarting one) is safe.
"""

from __future__ import annotations

import asyncio
import logging

from fedrpc.context import Services

log = logging.getLogger("fedrpc.tasks")

IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600


async def purge_idempotency_keys(services: Services) -> None:
    await services.db.run("idempotency.delete_expired_keys", max_age_seconds=IDEMPOTENCY_WINDOW_SECONDS)


JOBS = (purge_idempotency_keys,)


async def run_periodically(services: Services, interval_seconds: float) -> None:
    """Run every job, then sleep; a failing job is logged and retried next time."""
    while True:
        for job in JOBS:
            try:
                await job(services)
            except Exception:
                log.exception("background job %s failed", job.__name__)
        await asyncio.sleep(interval_seconds)
