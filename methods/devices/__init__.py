"""devices.*: register devices, read and list them, and the device heartbeat."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec

from fedrpc.auth import DEVICE_TOKEN_PREFIX, new_id, new_token, require_org
from fedrpc.context import Context
from fedrpc.errors import Forbidden, NotFound, PayloadTooLarge
from fedrpc.registry import DEVICE, ORG, ORG_OR_DEVICE, rpc_method
from schemas.devices import (
    STATE_MAX_BYTES,
    DesiredState,
    Device,
    GetParams,
    ListParams,
    ListResult,
    Owner,
    RegisterParams,
    RegisterResult,
    RoundOffer,
    StopRound,
    SyncParams,
    SyncResult,
)

_encode = msgspec.json.Encoder().encode
_SHOWN_IDS = 20


def require_owned(owners: list[Owner], wanted: Iterable[str], org_id: str, noun: str) -> None:
    """All wanted ids must be ``org_id``'s (else Forbidden, checked first) and exist (else NotFound)."""
    found = {o.id: o.org_id for o in owners}
    foreign = sorted(i for i, owner in found.items() if owner != org_id)
    if foreign:
        raise Forbidden(
            f"the organization does not own every {noun} named", ids=foreign[:_SHOWN_IDS]
        )
    missing = sorted(set(wanted) - found.keys())
    if missing:
        raise NotFound(f"no {noun} with these ids", ids=missing[:_SHOWN_IDS])


@rpc_method(ORG)
async def register(ctx: Context, p: RegisterParams) -> RegisterResult:
    """Register a device; its bearer token is in this result and nowhere else.

    Named groups must all be the organization's; otherwise nothing is written.
    """
    if p.device_group_ids:
        owners = await ctx.db.all(
            "devices.groups.list_group_owners", Owner, group_ids=p.device_group_ids
        )
        require_owned(owners, p.device_group_ids, ctx.org_id, "device group")
    token, digest = new_token(DEVICE_TOKEN_PREFIX)
    device = await ctx.db.get(
        "devices.insert_device",
        Device,
        id=new_id("dev"),
        org_id=ctx.org_id,
        token_hash=digest,
        platform=p.platform,
        os_version=p.os_version,
        model=p.model,
        app_version=p.app_version,
        group_ids=p.device_group_ids,
        **msgspec.structs.asdict(p.capabilities),
    )
    return RegisterResult(device_id=device.id, token=token, device=device)


@rpc_method(ORG_OR_DEVICE)
async def get(ctx: Context, p: GetParams) -> Device:
    """One device; a device may read only its own record."""
    if ctx.principal.kind == "device" and p.device_id != ctx.principal.device_id:
        raise Forbidden("a device may read only its own record")
    device = await ctx.db.get(
        "devices.get_device", Device, missing="no device with this id", device_id=p.device_id
    )
    require_org(ctx.principal, device.org_id)
    return device


@rpc_method(ORG)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """The organization's devices, newest first (ties broken by id)."""
    if p.device_group_id is not None:
        owners = await ctx.db.all(
            "devices.groups.list_group_owners", Owner, group_ids=[p.device_group_id]
        )
        require_owned(owners, [p.device_group_id], ctx.org_id, "device group")
    filters = msgspec.structs.asdict(p)
    page = {"limit": filters.pop("limit"), "offset": filters.pop("offset")}
    items = await ctx.db.all("devices.list_devices", Device, org_id=ctx.org_id, **filters, **page)
    total = await ctx.db.value("devices.count_devices", org_id=ctx.org_id, **filters)
    return ListResult(items=items, total=total)


@rpc_method(DEVICE, errors=[PayloadTooLarge])
async def sync(ctx: Context, p: SyncParams) -> SyncResult:
    """Heartbeat: store the reported state, mark the device seen, answer what to do next.

    This is the hottest method: the heartbeats arriving together share one UPDATE
    (``Database.coalesced``), each device still getting its own row. Non-finite
    numbers cannot reach it: the JSON decoder refuses NaN/Infinity literals and
    out-of-range numbers such as 1e999.
    """
    state = None if p.state is None else _encode(p.state)
    if state is not None and len(state) > STATE_MAX_BYTES:
        raise PayloadTooLarge(
            f"state must be at most {STATE_MAX_BYTES} bytes as JSON", max_bytes=STATE_MAX_BYTES
        )
    beat = await ctx.db.coalesced(
        "devices.update_device_states",
        Heartbeat,
        key="device_id",
        device_id=ctx.device_id,
        battery_pct=p.battery_pct,
        charging=p.charging,
        network_type=p.network_type,
        available_storage_mb=p.available_storage_mb,
        app_version=p.app_version,
        state=None if state is None else msgspec.Raw(state),
    )
    if beat is None:
        raise Forbidden("this device has been revoked")
    expires = ctx.settings.presign_expiry_seconds
    offers = [
        msgspec.convert(
            # Not popped: callers merged into one row share its offers (RoundOffer drops the key).
            {**o, "weights_url": ctx.storage.presigned_get(o["object_key"], expires)},
            RoundOffer,
        )
        for o in beat.round_offers
    ]
    return SyncResult(
        device_id=ctx.device_id,
        server_time=beat.last_seen_at,
        next_poll_interval_seconds=ctx.settings.sync_interval_seconds,
        desired_state=DesiredState(round_offers=offers, stop_rounds=beat.stop_rounds),
    )


class Heartbeat(msgspec.Struct):
    device_id: str
    last_seen_at: datetime
    round_offers: list[dict[str, Any]]
    stop_rounds: list[StopRound]
