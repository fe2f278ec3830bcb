"""training.updates.*: what has arrived for a model, for the organizations that may read it.

Privacy rule (docs/design.md, "What another organization sees"): rows
(``list``, ``by_device``) cover only the caller's own devices, whoever runs the
round: an organization never learns another organization's device ids, update
ids, sample counts or metrics per update. Every organization whose
devices updated the model in a round the caller may read (its own rounds and
those of federations it is an active member of), the caller's own included,
appears in ``participation`` as ``{org_id, devices, updates}``, the same in all
three methods.
``stats`` totals over those rounds, every member's devices included.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from fedrpc.context import Context
from fedrpc.registry import ORG, rpc_method
from fedrpc.services.policy import model_for_reading
from schemas.training.updates import (
    ByDeviceParams,
    ByDeviceResult,
    DeviceContribution,
    ListParams,
    ListResult,
    OrgUpdates,
    Stats,
    StatsParams,
)
from schemas.training.weights import Update


class _Totals(msgspec.Struct, kw_only=True):
    update_count: int
    total_samples: int
    last_received_at: datetime | None


async def _participation(ctx: Context, args: dict) -> list[OrgUpdates]:
    return await ctx.db.all("training.updates.list_participation", OrgUpdates, **args)


@rpc_method(ORG)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """Metadata of the updates the caller's own devices made for the model, newest first (never the bytes)."""
    await model_for_reading(ctx, p.model_id)
    args = {"model_id": p.model_id, "version": p.version, "org_id": ctx.org_id}
    items = await ctx.db.all(
        "training.updates.list_updates", Update, limit=p.limit, offset=p.offset, **args
    )
    return ListResult(
        items=items,
        total=await ctx.db.value("training.updates.count_updates", **args),
        participation=await _participation(ctx, args),
    )


@rpc_method(ORG)
async def stats(ctx: Context, p: StatsParams) -> Stats:
    """Totals over the model's updates in every round the caller may read, all members' devices included."""
    await model_for_reading(ctx, p.model_id)
    args = {"model_id": p.model_id, "version": p.version, "org_id": ctx.org_id}
    totals = await ctx.db.get("training.updates.get_update_stats", _Totals, **args)
    return Stats(
        model_id=p.model_id,
        version=p.version,
        update_count=totals.update_count,
        total_samples=totals.total_samples,
        last_received_at=totals.last_received_at,
        participation=await _participation(ctx, args),
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
        items=items,
        total=await ctx.db.value("training.updates.count_contributing_devices", **args),
        participation=await _participation(ctx, args),
    )
