"""Who may see which model: one place, so every namespace applies the same rule."""

from __future__ import annotations

from fedrpc.context import Context
from fedrpc.errors import Forbidden
from schemas.models import Model


async def model_for_reading(ctx: Context, model_id: str) -> Model:
    """The model, if the caller's organization (or one of its devices) may read it."""
    model = await ctx.db.get("models.find_model", Model, model_id=model_id, missing="no model with this id")
    if model.org_id != ctx.org_id:
        raise Forbidden("the organization does not own this model")
    return model


async def model_for_writing(ctx: Context, model_id: str) -> Model:
    """The model, if the caller is its organization (devices never write models)."""
    model = await model_for_reading(ctx, model_id)
    if ctx.principal.kind != "org":
        raise Forbidden("only the owning organization may change a model")
    return model
