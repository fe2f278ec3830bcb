"""Who may see what: one place, so every namespace applies the same rules.

An organization reads its own models and the models shared into federations
it is an active member of; its devices read what it reads. Only the owner
changes a model or a federation.
"""

from __future__ import annotations

import msgspec

from fedrpc.context import Context
from fedrpc.errors import Forbidden
from schemas.federations import Federation
from schemas.models import Model
from schemas.training import Round


async def _find_model(ctx: Context, model_id: str) -> Model:
    return await ctx.db.get(
        "models.find_model",
        Model,
        model_id=model_id,
        reader_org_id=ctx.org_id,
        missing="no model with this id",
    )


async def model_for_reading(ctx: Context, model_id: str) -> Model:
    """The model, if the caller's organization (or one of its devices) may read it."""
    model = await _find_model(ctx, model_id)
    if model.org_id != ctx.org_id and not await ctx.db.value(
        "federations.models.find_member_share", model_id=model_id, org_id=ctx.org_id
    ):
        raise Forbidden("the organization does not own this model")
    return model


async def model_for_writing(ctx: Context, model_id: str) -> Model:
    """The model, if the caller is the organization that owns it."""
    model = await _find_model(ctx, model_id)
    if model.org_id != ctx.org_id or ctx.principal.kind != "org":
        raise Forbidden("the organization does not own this model")
    return model


class FederationRole(Federation, kw_only=True):
    role: str  # owner | active | invited | none


async def federation_role(ctx: Context, federation_id: str) -> FederationRole:
    return await ctx.db.get(
        "federations.find_federation_role",
        FederationRole,
        federation_id=federation_id,
        org_id=ctx.org_id,
        missing="no federation with this id",
    )


async def federation_for_member(ctx: Context, federation_id: str) -> Federation:
    """The federation, if the caller's organization owns it or is an active member."""
    found = await federation_role(ctx, federation_id)
    if found.role not in ("owner", "active"):
        raise Forbidden("the organization is not a member of this federation")
    return _plain(found)


async def federation_for_owner(ctx: Context, federation_id: str) -> Federation:
    """The federation, if the caller's organization owns it."""
    found = await federation_role(ctx, federation_id)
    if found.role != "owner":
        raise Forbidden("the organization does not own this federation")
    return _plain(found)


def _plain(found: FederationRole) -> Federation:
    fields = {f: getattr(found, f) for f in Federation.__struct_fields__}
    return msgspec.convert(fields, Federation)


class RoundRole(Round, kw_only=True):
    role: str  # owner | member | none


async def round_for_reading(ctx: Context, round_id: str) -> RoundRole:
    """The round, if the caller's organization runs it or is an active member of its federation."""
    found = await ctx.db.get(
        "training.find_round",
        RoundRole,
        round_id=round_id,
        org_id=ctx.org_id,
        missing="no round with this id",
    )
    if found.role == "none":
        raise Forbidden("the organization does not own this round")
    return found


async def round_for_owner(ctx: Context, round_id: str) -> RoundRole:
    """The round, if the caller's organization runs it."""
    found = await round_for_reading(ctx, round_id)
    if found.role != "owner":
        raise Forbidden("the organization does not own this round")
    return found
