"""A federation's privacy ledger: price a round against the budget, charge it atomically.

The federation row is locked while a charge is priced and recorded, so two
rounds charging at the same moment are serialized: the second one is priced
with the first one already in the history and cannot slip under the budget.
"""

from __future__ import annotations

import asyncio
import sys

import msgspec

from fedrpc.db import Database
from fedrpc.errors import PrivacyBudgetExhausted
from fedrpc.fl.privacy import BudgetCheck, RoundCharge, check_charge, compose_epsilon
from schemas.federations.privacy import LedgerEntry

DEFAULT_DELTA = 1e-5
# With no budget set nothing can exceed it: price against the largest finite float.
NO_BUDGET = sys.float_info.max


class BudgetRow(msgspec.Struct):
    id: str
    total_epsilon_budget: float | None
    total_delta_budget: float | None


class Charge(msgspec.Struct):
    noise_multiplier: float
    sample_rate: float
    num_steps: int


async def recorded_charges(db: Database, federation_id: str) -> list[RoundCharge]:
    """Every charged round of the federation, oldest first."""
    rows = await db.all("federations.privacy.list_charges", Charge, federation_id=federation_id)
    return [RoundCharge(c.noise_multiplier, c.sample_rate, c.num_steps) for c in rows]


async def spent(db: Database, federation_id: str, *, delta: float) -> tuple[float, int]:
    """The epsilon of the whole recorded history at ``delta`` (composed once), and its round count."""
    recorded = await recorded_charges(db, federation_id)
    return compose_epsilon(recorded, delta), len(recorded)


async def price(
    db: Database,
    federation_id: str,
    charge: RoundCharge,
    *,
    delta: float,
    epsilon_budget: float | None,
    accountant: str = "rdp",
) -> BudgetCheck:
    """What charging ``charge`` would do, given the recorded history; records nothing."""
    recorded = await recorded_charges(db, federation_id)
    budget = NO_BUDGET if epsilon_budget is None else epsilon_budget
    # Cached RDP pricing takes microseconds; PLD convolutions can take a while, so off the loop.
    if accountant == "rdp":
        return check_charge(recorded, charge, epsilon_budget=budget, delta=delta)
    return await asyncio.to_thread(
        check_charge, recorded, charge, epsilon_budget=budget, delta=delta, accountant=accountant
    )


async def charge_round(
    db: Database, federation_id: str, round_id: str, charge: RoundCharge
) -> LedgerEntry:
    """Record a round's privacy cost, or refuse with privacy_budget_exhausted."""
    async with db.transaction() as tx:
        budget = await tx.get(
            "federations.privacy.lock_budget",
            BudgetRow,
            federation_id=federation_id,
            missing="no federation with this id",
        )
        delta = budget.total_delta_budget or DEFAULT_DELTA
        check = await price(
            tx, federation_id, charge, delta=delta, epsilon_budget=budget.total_epsilon_budget
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
