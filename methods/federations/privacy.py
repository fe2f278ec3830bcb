"""federations.privacy.*: the federation's differential-privacy budget and ledger."""

from __future__ import annotations

from fedrpc.context import Context
from fedrpc.fl.privacy import RoundCharge
from fedrpc.registry import ORG, rpc_method
from fedrpc.services.policy import federation_for_member, federation_for_owner
from fedrpc.services.privacy_budget import DEFAULT_DELTA, price, spent
from schemas.federations.privacy import (
    Budget,
    Estimate,
    EstimateParams,
    GetParams,
    HistoryParams,
    HistoryResult,
    LedgerEntry,
    PrivacyState,
    SetBudgetParams,
)


@rpc_method(ORG)
async def get(ctx: Context, p: GetParams) -> PrivacyState:
    """The budget, the epsilon spent so far (composed over every charged round) and what remains."""
    fed = await federation_for_member(ctx, p.federation_id)
    delta = fed.total_delta_budget or DEFAULT_DELTA
    epsilon, rounds = await spent(ctx.db, fed.id, delta=delta, pool=ctx.services.math_pool)
    has_budget = fed.total_epsilon_budget is not None
    return PrivacyState(
        federation_id=fed.id,
        budget=Budget(total_epsilon_budget=fed.total_epsilon_budget, total_delta_budget=delta)
        if has_budget
        else None,
        total_epsilon_budget=fed.total_epsilon_budget,
        total_delta_budget=fed.total_delta_budget,
        delta=delta,
        current_epsilon_spent=epsilon,
        epsilon_remaining=max(0.0, fed.total_epsilon_budget - epsilon) if has_budget else None,
        is_exhausted=has_budget and epsilon >= fed.total_epsilon_budget,
        rounds_tracked=rounds,
    )


@rpc_method(ORG)
async def set_budget(ctx: Context, p: SetBudgetParams) -> PrivacyState:
    """Set the budget (owner only); the history is kept, a budget below the spent epsilon exhausts it.

    Without ``total_delta_budget`` the current delta is kept (1e-5 if there was no budget).
    A new delta re-prices what was spent: the ledger keeps every round's (noise, rate,
    steps), so the whole history is composed again at the new delta (a larger delta
    gives a smaller epsilon for the same rounds, a smaller one a larger epsilon and
    perhaps an exhausted budget); ledger rows keep the delta they were charged at.
    """
    await federation_for_owner(ctx, p.federation_id)
    await ctx.db.run(
        "federations.privacy.update_budget",
        federation_id=p.federation_id,
        total_epsilon_budget=p.total_epsilon_budget,
        total_delta_budget=p.total_delta_budget,
        default_delta=DEFAULT_DELTA,
    )
    return await get(ctx, GetParams(federation_id=p.federation_id))


@rpc_method(ORG)
async def estimate(ctx: Context, p: EstimateParams) -> Estimate:
    """Price one more round against the budget without recording anything.

    The math runs in the app's worker pool (docs/privacy.md, "Where the math runs"): past
    ``FEDRPC_MATH_TIME_LIMIT_SECONDS`` the answer is ``bad_request`` with ``data.reason =
    "too_expensive"`` (ask for less: the rdp accountant, fewer distinct pairs); with the pool's
    queue full, or this organization's share of it taken, ``rate_limited`` with
    ``data.reason = "math_pool_busy"`` (retry later). An
    epsilon the accountant cannot bound (PLD below its truncated mass, about 1e-15) is
    ``bad_request`` with ``data.path = "$.target_delta"``, never an infinite number.
    """
    fed = await federation_for_member(ctx, p.federation_id)
    delta = p.target_delta or fed.total_delta_budget or DEFAULT_DELTA
    check = await price(
        ctx.db,
        fed.id,
        RoundCharge(p.noise_multiplier, p.sample_rate, p.num_steps),
        delta=delta,
        epsilon_budget=fed.total_epsilon_budget,
        accountant=p.accountant,
        pool=ctx.services.math_pool,
        owner=ctx.org_id,
    )
    return Estimate(
        federation_id=fed.id,
        accountant=p.accountant,
        target_delta=delta,
        current_epsilon=check.current_epsilon,
        projected_epsilon=check.projected_epsilon,
        round_epsilon_cost=check.round_epsilon,
        would_exceed_budget=fed.total_epsilon_budget is not None and check.exceeds_budget,
        budget_epsilon=fed.total_epsilon_budget,
    )


@rpc_method(ORG)
async def history(ctx: Context, p: HistoryParams) -> HistoryResult:
    """One row per charged round, oldest first, with the composed epsilon after it."""
    await federation_for_member(ctx, p.federation_id)
    items = await ctx.db.all(
        "federations.privacy.list_ledger",
        LedgerEntry,
        federation_id=p.federation_id,
        limit=p.limit,
        offset=p.offset,
    )
    total = await ctx.db.value("federations.privacy.count_ledger", federation_id=p.federation_id)
    return HistoryResult(federation_id=p.federation_id, items=items, total=total)
