"""A federation's privacy ledger: price a round against the budget, charge it atomically.

The federation row is locked while a charge is priced and recorded, so two
rounds charging at the same moment are serialized: the second one is priced
with the first one already in the history and cannot slip under the budget.

Where the math runs (docs/privacy.md, "Where the math runs"): on the event loop
only when it costs microseconds, the RDP accountant with every (noise, rate)
pair's one-step curve already cached and at most ``INLINE_MAX_PAIRS`` distinct
pairs. Anything else, a new pair's curve (up to ~50 ms) or a PLD composition
(seconds), runs in the app's :class:`fedrpc.math_pool.MathPool`, RDP in its
quick lane; a worker's answer carries the curves it computed, so the cache
learns them and the next price of those pairs is inline. Without a pool (a
script, a caller not handed one) RDP runs inline and PLD in a thread.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import msgspec

from fedrpc.db import Database
from fedrpc.errors import BadRequest, PrivacyBudgetExhausted
from fedrpc.fl.privacy import (
    BudgetCheck,
    RoundCharge,
    history_epsilon_job,
    price_job,
    remember_curves,
    uncached_pairs,
)
from fedrpc.math_pool import MathPool
from schemas.federations.privacy import LedgerEntry

DEFAULT_DELTA = 1e-5
# With no budget set nothing can exceed it: price against the largest finite float.
NO_BUDGET = sys.float_info.max
# Up to this many cached pairs an RDP price is a few vector sums (< 1 ms) on the loop.
INLINE_MAX_PAIRS = 256


class BudgetRow(msgspec.Struct):
    id: str
    total_epsilon_budget: float | None
    total_delta_budget: float | None


class Charge(msgspec.Struct):
    noise_multiplier: float
    sample_rate: float
    num_steps: int
    rounds: int


async def recorded_charges(db: Database, federation_id: str) -> tuple[list[RoundCharge], int]:
    """The federation's charged steps, one charge per (noise, rate) pair in the order first
    charged (steps of equal pairs compose as one), and how many rounds were charged."""
    rows = await db.all("federations.privacy.list_charges", Charge, federation_id=federation_id)
    charges = [RoundCharge(c.noise_multiplier, c.sample_rate, c.num_steps) for c in rows]
    return charges, sum(c.rounds for c in rows)


async def spent(
    db: Database, federation_id: str, *, delta: float, pool: MathPool | None = None
) -> tuple[float, int]:
    """The epsilon of the whole recorded history at ``delta`` (composed once), and its round count."""
    recorded, rounds = await recorded_charges(db, federation_id)
    epsilon = await _account(pool, "rdp", recorded, partial(history_epsilon_job, recorded, delta))
    return epsilon, rounds


async def price(
    db: Database,
    federation_id: str,
    charge: RoundCharge,
    *,
    delta: float,
    epsilon_budget: float | None,
    accountant: str = "rdp",
    pool: MathPool | None = None,
    owner: str | None = None,
) -> BudgetCheck:
    """What charging ``charge`` would do, given the recorded history; records nothing.

    ``owner`` (the asking organization) is charged a share of the pool's heavy lane.

    Raises
    ------
    BadRequest
        The accountant cannot bound epsilon at ``delta`` (``data.path = "$.target_delta"``,
        ``data.reason = "unbounded_epsilon"``): PLD charges the mass it truncates (about
        1e-15) to an infinite loss, so below that delta its epsilon is infinite, which
        JSON cannot carry and no budget admits.
    """
    recorded, _ = await recorded_charges(db, federation_id)
    budget = NO_BUDGET if epsilon_budget is None else epsilon_budget
    job = partial(
        price_job, recorded, charge, epsilon_budget=budget, delta=delta, accountant=accountant
    )
    check = await _account(pool, accountant, [*recorded, charge], job, owner)
    epsilons = (check.current_epsilon, check.projected_epsilon, check.round_epsilon)
    if not all(math.isfinite(e) for e in epsilons):
        raise BadRequest(
            f"the {accountant} accountant cannot bound epsilon at delta {delta:g}: ask for a "
            "larger target_delta, or the rdp accountant",
            path="$.target_delta",
            reason="unbounded_epsilon",
            delta=delta,
        )
    return check


async def _account(
    pool: MathPool | None,
    accountant: str,
    charges: Sequence[RoundCharge],
    job: Callable[..., tuple[Any, dict]],
    owner: str | None = None,
) -> Any:
    """``job``'s answer: inline when it costs microseconds, else in ``pool`` (see the module doc)."""
    pairs = list(dict.fromkeys((c.noise_multiplier, c.sample_rate) for c in charges))
    if accountant == "rdp":
        missing = uncached_pairs(pairs)
        if pool is None or (not missing and len(pairs) <= INLINE_MAX_PAIRS):
            return job(learn=())[0]
        answer, curves = await pool.run(partial(job, learn=missing), quick=True)
        remember_curves(curves)
        return answer
    if pool is None:
        return (await asyncio.to_thread(job))[0]
    return (await pool.run(job, owner=owner))[0]


async def charge_round(
    db: Database,
    federation_id: str,
    round_id: str,
    charge: RoundCharge,
    *,
    pool: MathPool | None = None,
) -> LedgerEntry:
    """Record a round's privacy cost, or refuse with privacy_budget_exhausted.

    Give the app's ``pool`` (``ctx.services.math_pool``) so that a new (noise, rate)
    pair is priced off the event loop, in the pool's quick lane.
    """
    async with db.transaction() as tx:
        budget = await tx.get(
            "federations.privacy.lock_budget",
            BudgetRow,
            federation_id=federation_id,
            missing="no federation with this id",
        )
        delta = budget.total_delta_budget or DEFAULT_DELTA
        check = await price(
            tx,
            federation_id,
            charge,
            delta=delta,
            epsilon_budget=budget.total_epsilon_budget,
            pool=pool,
        )
        if check.exceeds_budget:
            raise PrivacyBudgetExhausted(
                "this round would exceed the federation's privacy budget",
                current_epsilon=check.current_epsilon,
                projected_epsilon=check.projected_epsilon,
                budget_epsilon=budget.total_epsilon_budget,
            )
        return await tx.get(
            "federations.privacy.insert_charge",
            LedgerEntry,
            federation_id=federation_id,
            round_id=round_id,
            noise_multiplier=charge.noise_multiplier,
            sample_rate=charge.sample_rate,
            num_steps=charge.num_steps,
            round_epsilon_cost=check.round_epsilon,
            cumulative_epsilon=check.projected_epsilon,
            delta=delta,
        )
