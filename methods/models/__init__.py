"""models.*: create, list and read models."""

from __future__ import annotations

from fedrpc.auth import new_id
from fedrpc.context import Context
from fedrpc.db import constraint_message
from fedrpc.registry import ORG, ORG_OR_DEVICE, rpc_method
from fedrpc.services.policy import model_for_reading
from schemas.models import CreateParams, GetParams, ListParams, ListResult, Model

constraint_message("models_org_name_key", "the organization already has a model with this name")


@rpc_method(ORG)
async def create(ctx: Context, p: CreateParams) -> Model:
    """Create a model; its versions are registered with models.versions.create."""
    return await ctx.db.get(
        "models.insert_model",
        Model,
        id=new_id("mdl"),
        org_id=ctx.org_id,
        name=p.name,
        framework=p.framework,
        use_case=p.use_case,
        description=p.description,
    )


@rpc_method(ORG)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """The organization's models, newest first."""
    args = {"org_id": ctx.org_id, "name": p.name}
    items = await ctx.db.all("models.list_models", Model, limit=p.limit, offset=p.offset, **args)
    return ListResult(items=items, total=await ctx.db.value("models.count_models", **args))


@rpc_method(ORG_OR_DEVICE)
async def get(ctx: Context, p: GetParams) -> Model:
    """One model with its latest version number."""
    return await model_for_reading(ctx, p.model_id)
