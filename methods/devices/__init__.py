"""devices.*: register and revoke devices, read and list them, the device heartbeat."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from fedrpc.auth import DEVICE_TOKEN_PREFIX, new_id, new_token
from fedrpc.context import Context
from fedrpc.db import Database
from fedrpc.errors import Forbidden, PayloadTooLarge, Unauthorized
from fedrpc.registry import DEVICE, ENROLL, ORG, ORG_OR_DEVICE, rpc_method
from fedrpc.services.policy import own_devices, own_groups, require_org
from schemas.devices import (
    STATE_MAX_BYTES,
    DesiredState,
    Device,
    EnrollmentClaim,
    GetParams,
    ListParams,
    ListResult,
    RegisterParams,
    RegisterResult,
    RevokeParams,
    RevokeResult,
    RotateTokenParams,
    RotateTokenResult,
    RoundOffer,
    StopRound,
    SyncParams,
    SyncResult,
)

_encode = msgspec.json.Encoder().encode
_SHOWN_IDS = 20


@rpc_method(ORG | ENROLL, errors=[Unauthorized])
async def register(ctx: Context, p: RegisterParams) -> RegisterResult:
    """Register a device; its bearer token is in this result and nowhere else.

    Named groups must all be the organization's; otherwise nothing is written. With
    an enrollment key the registration counts against the key in the same
    transaction, so a full, expired or revoked key registers nothing.
    """
    token, digest = new_token(DEVICE_TOKEN_PREFIX)
    async with ctx.db.transaction() as db:
        if ctx.principal.kind == "enroll":
            group_ids = await _claim_enrollment(db, ctx.principal.key_id, p.device_group_ids)
        else:
            group_ids = await own_groups(db, ctx.org_id, p.device_group_ids)
        device = await db.get(
            "devices.insert_device",
            Device,
            id=new_id("dev"),
            org_id=ctx.org_id,
            token_hash=digest,
            platform=p.platform,
            os_version=p.os_version,
            model=p.model,
            app_version=p.app_version,
            group_ids=group_ids,
            registered_by_key=ctx.principal.key_id,
            **msgspec.structs.asdict(p.capabilities),
        )
    return RegisterResult(device_id=device.id, token=token, device=device)


async def _claim_enrollment(db: Database, key_id: str | None, wanted: list[str]) -> list[str]:
    """Count one registration against an enrollment key; the groups the device joins."""
    claim = await db.get("orgs.api_keys.claim_enrollment", EnrollmentClaim, key_id=key_id)
    if claim.revoked or claim.expired:
        raise Unauthorized("the enrollment key has expired or has been revoked")
    if not claim.claimed:
        raise Forbidden("the enrollment key has registered its maximum number of devices")
    foreign = sorted(set(wanted) - set(claim.device_group_ids))
    if foreign:
        raise Forbidden(
            "an enrollment key registers devices only into its own device groups",
            ids=foreign[:_SHOWN_IDS],
        )
    return claim.device_group_ids


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
        await own_groups(ctx.db, ctx.org_id, [p.device_group_id])
    filters = msgspec.structs.asdict(p)
    page = {"limit": filters.pop("limit"), "offset": filters.pop("offset")}
    items = await ctx.db.all("devices.list_devices", Device, org_id=ctx.org_id, **filters, **page)
    total = await ctx.db.value("devices.count_devices", org_id=ctx.org_id, **filters)
    return ListResult(items=items, total=total)


@rpc_method(ORG)
async def revoke(ctx: Context, p: RevokeParams) -> RevokeResult:
    """Revoke one of the organization's devices; its token stops working for good.

    The serving process forgets it at once; every other within ``auth_cache_seconds``.
    """
    await own_devices(ctx.db, ctx.org_id, [p.device_id])
    revoked = await ctx.db.get(
        "devices.revoke_device", RevokeResult, device_id=p.device_id, reason=p.reason
    )
    ctx.services.auth.forget(device_id=p.device_id)
    return revoked


@rpc_method(DEVICE, errors=[Unauthorized])
async def rotate_token(ctx: Context, p: RotateTokenParams) -> RotateTokenResult:
    """Give the calling device a new token; the one it called with is dead from now on."""
    token, digest = new_token(DEVICE_TOKEN_PREFIX)
    rotated = await ctx.db.value(
        "devices.update_device_token",
        device_id=ctx.device_id,
        current_hash=ctx.principal.token_hash,
        token_hash=digest,
    )
    if rotated is None:
        raise Unauthorized("the token has been rotated already or the device revoked")
    ctx.services.auth.forget(device_id=ctx.device_id)
    return RotateTokenResult(device_id=ctx.device_id, token=token)


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
