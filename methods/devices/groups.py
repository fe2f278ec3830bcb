"""devices.groups.*: create and list device groups, add devices to them."""

from __future__ import annotations

from fedrpc.auth import new_id
from fedrpc.context import Context
from fedrpc.db import constraint_message
from fedrpc.registry import ORG, rpc_method
from fedrpc.services.policy import own_devices, own_groups
from schemas.devices.groups import (
    AddDevicesParams,
    AddDevicesResult,
    CreateParams,
    Group,
    ListParams,
    ListResult,
)

constraint_message(
    "device_groups_org_name_key", "the organization already has a device group with this name"
)


@rpc_method(ORG)
async def create(ctx: Context, p: CreateParams) -> Group:
    """Create an empty device group; a name already used in the organization is a conflict."""
    return await ctx.db.get(
        "devices.groups.insert_group",
        Group,
        id=new_id("grp"),
        org_id=ctx.org_id,
        name=p.name,
        description=p.description,
    )


@rpc_method(ORG)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """The organization's device groups with their member counts, newest first."""
    items = await ctx.db.all(
        "devices.groups.list_groups", Group, org_id=ctx.org_id, limit=p.limit, offset=p.offset
    )
    return ListResult(
        items=items, total=await ctx.db.value("devices.groups.count_groups", org_id=ctx.org_id)
    )


@rpc_method(ORG)
async def add_devices(ctx: Context, p: AddDevicesParams) -> AddDevicesResult:
    """Add the organization's devices to one of its groups; nothing is written unless all are its own."""
    async with ctx.db.transaction() as tx:
        await own_groups(tx, ctx.org_id, [p.group_id])
        await own_devices(tx, ctx.org_id, p.device_ids)
        added = await tx.run(
            "devices.groups.insert_members", group_id=p.group_id, device_ids=p.device_ids
        )
        member_count = await tx.value("devices.groups.count_members", group_id=p.group_id)
    return AddDevicesResult(group_id=p.group_id, added=added, member_count=member_count)
