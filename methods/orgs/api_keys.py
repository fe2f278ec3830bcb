"""orgs.api_keys.*: create, list and revoke the organization's API keys."""

from __future__ import annotations

import msgspec

from fedrpc.auth import ORG_KEY_PREFIX, new_id, new_token
from fedrpc.context import Context
from fedrpc.errors import NotFound
from fedrpc.registry import ORG, rpc_method
from fedrpc.services.policy import own_groups, require_org
from schemas.orgs.api_keys import (
    ApiKey,
    CreateParams,
    CreateResult,
    ListParams,
    ListResult,
    RevokeParams,
    RevokeResult,
)


@rpc_method(ORG)
async def create(ctx: Context, p: CreateParams) -> CreateResult:
    """Create an API key; its token is in this result and nowhere else, ever.

    The device groups an enrollment key is bound to must all be the organization's.
    """
    await own_groups(ctx.db, ctx.org_id, p.device_group_ids)
    token, digest = new_token(ORG_KEY_PREFIX)
    new_key = {"id": new_id("key"), "org_id": ctx.org_id, "name": p.name}
    new_key |= {"token_hash": digest, "prefix": token[:8]}
    if p.scope == "admin":
        key = await ctx.db.get("orgs.api_keys.insert_key", ApiKey, **new_key)
    else:
        bounds = {"expires_in_seconds": p.expires_in_seconds, "max_devices": p.max_devices}
        key = await ctx.db.get(
            "orgs.api_keys.insert_enroll_key",
            ApiKey,
            device_group_ids=p.device_group_ids,
            **bounds,
            **new_key,
        )
    fields = msgspec.structs.asdict(key)
    del fields["devices_registered"], fields["revoked_at"]
    return CreateResult(token=token, **fields)


@rpc_method(ORG)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """The organization's API keys, newest first."""
    args = {"org_id": ctx.org_id, "include_revoked": p.include_revoked}
    items = await ctx.db.all(
        "orgs.api_keys.list_keys", ApiKey, limit=p.limit, offset=p.offset, **args
    )
    return ListResult(items=items, total=await ctx.db.value("orgs.api_keys.count_keys", **args))


@rpc_method(ORG)
async def revoke(ctx: Context, p: RevokeParams) -> RevokeResult:
    """Revoke a key: at once on this process, within ``auth_cache_seconds`` on every other."""
    owner = await ctx.db.value("orgs.api_keys.find_key_org", key_id=p.key_id)
    if owner is None:
        raise NotFound("no API key with this id")
    require_org(ctx.principal, owner)
    revoked = await ctx.db.get("orgs.api_keys.revoke_key", RevokeResult, key_id=p.key_id)
    ctx.services.auth.forget(key_id=p.key_id)
    return revoked
