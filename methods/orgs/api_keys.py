"""orgs.api_keys.*: create, list and revoke the organization's API keys."""

from __future__ import annotations

from fedrpc.auth import ORG_KEY_PREFIX, new_id, new_token, require_org
from fedrpc.context import Context
from fedrpc.errors import NotFound
from fedrpc.registry import ORG, rpc_method
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
    """Create an API key; its token is in this result and nowhere else, ever."""
    token, digest = new_token(ORG_KEY_PREFIX)
    key = await ctx.db.get(
        "orgs.api_keys.insert_key",
        ApiKey,
        id=new_id("key"),
        org_id=ctx.org_id,
        name=p.name,
        token_hash=digest,
        prefix=token[:8],
    )
    return CreateResult(
        id=key.id, name=key.name, token=token, prefix=key.prefix, created_at=key.created_at
    )


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
    """Revoke a key; it stops working at once, including for calls already authenticated with it."""
    owner = await ctx.db.value("orgs.api_keys.find_key_org", key_id=p.key_id)
    if owner is None:
        raise NotFound("no API key with this id")
    require_org(ctx.principal, owner)
    revoked = await ctx.db.get("orgs.api_keys.revoke_key", RevokeResult, key_id=p.key_id)
    ctx.services.auth.forget(key_id=p.key_id)
    return revoked
