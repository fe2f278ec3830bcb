"""training.updates.*: what has arrived for a model, for the organizations that may read it.

Privacy rule: metadata rows (``list``, ``by_device``) cover only the caller's
own devices, whoever runs the round: an organization never learns another
organization's device ids, sample counts or metrics per update. ``stats``
aggregates over every round the caller may read (its own rounds and those of
federations it is an active member of), so a member sees how much a shared
round received in total, but not another member's private rounds.
"""

from __future__ import annotations

from fedrpc.context import Context
from fedrpc.registry import ORG, rpc_method
from fedrpc.services.policy import model_for_reading
from schemas.training.updates import (
    ByDeviceParams,
    ByDeviceResult,
    DeviceContribution,
    ListParams,
    ListResult,
    Stats,
    StatsParams,
)
from schemas.training.weights import Update


@rpc_method(ORG)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """Metadata of the updates the caller's own devices made for the model, newest first (never the bytes)."""
    await model_for_reading(ctx, p.model_id)
    args = {"model_id": p.model_id, "version": p.version, "org_id": ctx.org_id}
    items = await ctx.db.all(
        "training.updates.list_updates", Update, limit=p.limit, offset=p.offset, **args
    )
    return ListResult(
        items=items, total=await ctx.db.value("training.updates.count_updates", **args)
    )


@rpc_method(ORG)
async def stats(ctx: Context, p: StatsParams) -> Stats:
    """Totals over the model's updates in every round the caller may read, all members' devices included."""
    await model_for_reading(ctx, p.model_id)
    return await ctx.db.get(
        "training.updates.get_update_stats",
        Stats,
        model_id=p.model_id,
        version=p.version,
        org_id=ctx.org_id,
    )


@rpc_method(ORG)
async def by_device(ctx: Context, p: ByDeviceParams) -> ByDeviceResult:
    """Update counts and sample totals per device of the caller's organization, most recently active first."""
    await model_for_reading(ctx, p.model_id)
    args = {"model_id": p.model_id, "version": p.version, "org_id": ctx.org_id}
    items = await ctx.db.all(
        "training.updates.list_device_contributions",
        DeviceContribution,
        limit=p.limit,
        offset=p.offset,
        **args,
    )
    return ByDeviceResult(
        items=items, total=await ctx.db.value("training.updates.count_contributing_devices", **args)
    )
