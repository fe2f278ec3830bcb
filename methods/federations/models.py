"""federations.models.*: share models into a federation and list them."""

from __future__ import annotations

from fedrpc.context import Context
from fedrpc.registry import ORG, rpc_method
from fedrpc.services.policy import federation_for_member, federation_for_owner, model_for_writing
from schemas.federations.models import ListParams, ListResult, SharedModel, ShareParams


@rpc_method(ORG)
async def share(ctx: Context, p: ShareParams) -> ListResult:
    """Share one of the owner's own models into the federation; returns the shared models."""
    await federation_for_owner(ctx, p.federation_id)
    await model_for_writing(ctx, p.model_id)
    await ctx.db.run(
        "federations.models.insert_shared_model", federation_id=p.federation_id, model_id=p.model_id
    )
    return await list_(ctx, ListParams(federation_id=p.federation_id))


@rpc_method(ORG)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """The models shared into the federation (members only)."""
    await federation_for_member(ctx, p.federation_id)
    items = await ctx.db.all(
        "federations.models.list_shared_models", SharedModel, federation_id=p.federation_id
    )
    return ListResult(federation_id=p.federation_id, items=items, total=len(items))
