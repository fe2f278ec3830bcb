"""Periodic housekeeping that runs inside the server process.

Every job is idempotent and claims its work in Postgres, so running several
server processes (or restarting one) is safe.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Literal

import msgspec

from fedrpc.context import Services
from fedrpc.errors import (
    AppError,
    BadRequest,
    Conflict,
    NotFound,
    PreconditionFailed,
    PrivacyBudgetExhausted,
)
from fedrpc.services import storage_gc
from fedrpc.services.round_aggregation import aggregate_round
from fedrpc.services.update_loop import RoundFailed
from fedrpc.settings import Settings

log = logging.getLogger("fedrpc.tasks")

IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600
SECAGG_NO_RESULT = (
    "the deadline passed without a SecAgg+ session result; a secure-aggregation round "
    "is aggregated by its session, never from plain updates"
)


async def purge_idempotency_keys(services: Services) -> None:
    await services.db.run(
        "idempotency.delete_expired_keys", max_age_seconds=IDEMPOTENCY_WINDOW_SECONDS
    )


class DueRound(msgspec.Struct):
    """A round this pass took up (``attempts`` counts this one)."""

    id: str
    org_id: str
    attempts: int
    secure_aggregation: bool
    past_deadline: bool
    secagg_stage: str | None = None
    secagg_failure: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What becomes of a due round that was not aggregated.

    ``fail``: failed now with ``reason``; ``wait``: taken up again at its deadline;
    ``retry``: taken up again after the back-off, failed once the attempts run out;
    ``none``: nothing to do (another call aggregated, cancelled or failed it).
    """

    action: Literal["fail", "wait", "retry", "none"]
    reason: str = ""


NOTHING = Outcome("none")


async def aggregate_due_rounds(services: Services) -> None:
    """One pass: take up at most ``aggregation_rounds_per_pass`` due auto rounds, round-robin
    across organizations (docs/aggregation.md), and aggregate, fail or reschedule each."""
    settings = services.settings
    for rnd in await services.db.all(
        "training.aggregate.claim_rounds_due",
        DueRound,
        max_rounds=settings.aggregation_rounds_per_pass,
        lease_seconds=settings.aggregation_lease_seconds,
    ):
        if rnd.attempts > settings.aggregation_max_attempts:
            # Earlier attempts never settled: their worker died (a round that crashes it).
            await _settle(services, rnd, Outcome("fail", "automatic aggregation never finished"))
            continue
        if rnd.secure_aggregation and rnd.secagg_stage != "completed":
            await _settle(services, rnd, secure_aggregation_outcome(rnd))
            continue
        try:
            await aggregate_round(
                services.db,
                services.storage,
                rnd.id,
                lease_seconds=services.settings.aggregation_lease_seconds,
            )
        except Exception as exc:
            await _settle(services, rnd, outcome_of_failure(rnd, exc))


def secure_aggregation_outcome(rnd: DueRound) -> Outcome:
    """The rule for a due secure-aggregation round whose session has not completed.

    Its result can only come from its SecAgg+ session (a completed one is
    aggregated like any round): a failed session fails the round with its
    reason; otherwise, once the deadline passed, the round fails; before that
    it waits for the deadline.
    """
    if rnd.secagg_stage == "failed":
        return Outcome("fail", f"its SecAgg+ session failed: {rnd.secagg_failure}")
    if rnd.past_deadline:
        return Outcome("fail", SECAGG_NO_RESULT)
    return Outcome("wait", "waiting for its SecAgg+ session")


def outcome_of_failure(rnd: DueRound, exc: Exception) -> Outcome:
    """Permanent failures fail the round now; transient ones are retried with back-off."""
    if isinstance(exc, Conflict) or (
        isinstance(exc, PreconditionFailed) and "allowed" in exc.details
    ):
        return NOTHING  # no longer running, or another call is aggregating it
    if isinstance(exc, PreconditionFailed):
        # The round's updates do not meet its rules (too few, too few organizations):
        # more may come until the deadline, none after it.
        return Outcome("fail" if rnd.past_deadline else "wait", exc.message)
    if isinstance(exc, RoundFailed | PrivacyBudgetExhausted | NotFound):
        return NOTHING  # aggregate_round failed the round with the reason (or it is gone)
    if isinstance(exc, BadRequest):
        # The strategy cannot combine these updates, and they will not change.
        return Outcome("fail", exc.message)
    if isinstance(exc, AppError):
        return Outcome("retry", exc.message)  # storage unreachable: it may pass
    log.warning("automatic aggregation of round %s failed", rnd.id, exc_info=exc)
    return Outcome("retry", "an internal error")


def backoff_seconds(attempt: int, settings: Settings) -> float:
    """Exponential back-off after the ``attempt``-th failed attempt (1-based), capped."""
    exponent = min(attempt - 1, 62)
    return min(
        settings.aggregation_backoff_seconds * 2**exponent, settings.aggregation_backoff_max_seconds
    )


async def _settle(services: Services, rnd: DueRound, outcome: Outcome) -> None:
    db, settings = services.db, services.settings
    if outcome.action == "retry" and rnd.attempts >= settings.aggregation_max_attempts:
        outcome = Outcome(
            "fail",
            f"automatic aggregation failed {rnd.attempts} times; last error: {outcome.reason}",
        )
    if outcome.action == "fail":
        await db.run(
            "training.aggregate.update_round_given_up",
            round_id=rnd.id,
            reason=outcome.reason,
            lease_seconds=settings.aggregation_lease_seconds,
        )
    elif outcome.action in ("wait", "retry"):
        delay = backoff_seconds(rnd.attempts, settings) if outcome.action == "retry" else 0.0
        await db.run(
            "training.aggregate.update_round_retry_later",
            round_id=rnd.id,
            delay_seconds=delay,
            wait_for_deadline=outcome.action == "wait",
            reason=outcome.reason,
        )
        log.info("round %s of %s: %s; taken up again later", rnd.id, rnd.org_id, outcome.reason)


async def collect_storage_garbage(services: Services) -> None:
    """One bounded pass of the storage collector (:mod:`fedrpc.services.storage_gc`); a used
    upload is kept as long as the idempotency results that may replay it."""
    await storage_gc.collect(
        services.db,
        services.storage,
        services.settings,
        used_upload_keep_seconds=IDEMPOTENCY_WINDOW_SECONDS,
    )


JOBS = (purge_idempotency_keys, aggregate_due_rounds, collect_storage_garbage)


async def run_periodically(services: Services, interval_seconds: float) -> None:
    """Run every job, then sleep; a failing job is logged and retried next time."""
    while True:
        for job in JOBS:
            try:
                await job(services)
            except Exception:
                log.exception("background job %s failed", job.__name__)
        await asyncio.sleep(interval_seconds)
