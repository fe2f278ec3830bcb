"""training.*: the lifecycle of a federated round from the server's side."""

from __future__ import annotations

from fedrpc.auth import new_id
from fedrpc.context import Context
from fedrpc.db import jsonb
from fedrpc.errors import BadRequest, Forbidden, NotFound, PreconditionFailed
from fedrpc.registry import ORG, rpc_method
from fedrpc.services.policy import (
    federation_for_member,
    model_for_reading,
    round_for_owner,
    round_for_reading,
)
from fedrpc.services.round_aggregation import aggregate_round
from fedrpc.services.rounds import transition
from fedrpc.services.selection import select_for_round
from schemas.models.versions import ModelVersion
from schemas.training import (
    AggregateParams,
    CancelRoundParams,
    CreateRoundParams,
    GetRoundParams,
    ListRoundsParams,
    ListRoundsResult,
    Progress,
    ProgressParams,
    Round,
    RoundDetail,
    SelectDevicesParams,
    SelectDevicesResult,
    StartRoundParams,
)


@rpc_method(ORG)
async def create_round(ctx: Context, p: CreateRoundParams) -> RoundDetail:
    """Create a round in state pending, for the caller's model or one shared into the federation."""
    model = await model_for_reading(ctx, p.model_id)
    if p.federation_id is not None:
        await federation_for_member(ctx, p.federation_id)
        shared = await ctx.db.value(
            "training.find_model_in_federation", model_id=p.model_id, federation_id=p.federation_id
        )
        if not shared and model.org_id != ctx.org_id:
            raise Forbidden("the model is not shared into this federation")
    elif model.org_id != ctx.org_id:
        raise Forbidden("a round on a shared model must name the federation it is shared into")
    if p.differential_privacy is not None and p.federation_id is None:
        raise BadRequest(
            "differential_privacy needs a federation_id: its budget is the federation's"
        )
    if p.min_updates > p.target_device_count:
        raise BadRequest("min_updates cannot exceed target_device_count")
    published = await ctx.db.value(
        "models.versions.find_version_published", model_id=p.model_id, version=p.base_version
    )
    # Other organizations do not see drafts at all.
    if published is None or (not published and model.org_id != ctx.org_id):
        raise NotFound("the model has no such base_version")
    if not published:
        raise PreconditionFailed(
            f"version {p.base_version} is a draft; publish it with models.versions.publish "
            "before a round can start from it",
            published=False,
        )
    round_id = await ctx.db.value(
        "training.insert_round",
        id=new_id("rnd"),
        org_id=ctx.org_id,
        model_id=p.model_id,
        base_version=p.base_version,
        federation_id=p.federation_id,
        target_device_count=p.target_device_count,
        min_updates=p.min_updates,
        deadline_seconds=p.deadline_seconds,
        update_format=p.update_format,
        strategy=p.strategy.name,
        strategy_params=jsonb(p.strategy.params),
        client_config=jsonb(p.client_config),
        dp_config=jsonb(p.differential_privacy) if p.differential_privacy else None,
        secagg_config=jsonb(p.secure_aggregation) if p.secure_aggregation else None,
        auto_aggregate=p.auto_aggregate,
        max_sample_count=p.max_sample_count,
        max_update_norm=p.max_update_norm,
    )
    return await get_round(ctx, GetRoundParams(round_id=round_id))


@rpc_method(ORG)
async def get_round(ctx: Context, p: GetRoundParams) -> RoundDetail:
    """A round with the devices selected for it."""
    found = await round_for_reading(ctx, p.round_id)
    devices = await ctx.db.column("training.list_round_devices", round_id=p.round_id)
    fields = {f: getattr(found, f) for f in Round.__struct_fields__}
    return RoundDetail(**fields, selected_devices=devices)


@rpc_method(ORG)
async def list_rounds(ctx: Context, p: ListRoundsParams) -> ListRoundsResult:
    """Rounds of the caller's organization and of its federations, newest first."""
    args = {
        "org_id": ctx.org_id,
        "model_id": p.model_id,
        "federation_id": p.federation_id,
        "state": p.state,
    }
    items = await ctx.db.all("training.list_rounds", Round, limit=p.limit, offset=p.offset, **args)
    return ListRoundsResult(items=items, total=await ctx.db.value("training.count_rounds", **args))


@rpc_method(ORG)
async def get_round_progress(ctx: Context, p: ProgressParams) -> Progress:
    """Selected and received counts, samples and time left: one query, for polling."""
    await round_for_reading(ctx, p.round_id)
    return await ctx.db.get("training.get_round_progress", Progress, round_id=p.round_id)


@rpc_method(ORG)
async def select_devices(ctx: Context, p: SelectDevicesParams) -> SelectDevicesResult:
    """Pick devices for a pending round uniformly at random (seeded; the seed is recorded)."""
    rnd = await round_for_owner(ctx, p.round_id)
    org_ids = [rnd.org_id]
    if rnd.federation_id is not None:
        org_ids = await ctx.db.column("training.list_member_orgs", federation_id=rnd.federation_id)
    chosen = await select_for_round(ctx.db, p.round_id, org_ids, p.criteria)
    return SelectDevicesResult(
        round_id=p.round_id,
        state="selected",
        selected=chosen.chosen,
        eligible_count=chosen.eligible_count,
        selection_seed=chosen.seed,
    )


@rpc_method(ORG)
async def start_round(ctx: Context, p: StartRoundParams) -> RoundDetail:
    """pending/selected -> running: selected devices get offers on their next sync; the deadline starts."""
    await round_for_owner(ctx, p.round_id)
    await transition(ctx.db, "training.update_round_started", p.round_id, ("pending", "selected"))
    return await get_round(ctx, GetRoundParams(round_id=p.round_id))


@rpc_method(ORG)
async def cancel_round(ctx: Context, p: CancelRoundParams) -> RoundDetail:
    """Cancel a round; devices are told to stop and its updates are never aggregated."""
    await round_for_owner(ctx, p.round_id)
    await transition(
        ctx.db,
        "training.update_round_cancelled",
        p.round_id,
        ("pending", "selected", "running"),
        reason=p.reason,
    )
    return await get_round(ctx, GetRoundParams(round_id=p.round_id))


@rpc_method(ORG)
async def aggregate(ctx: Context, p: AggregateParams) -> ModelVersion:
    """Combine the round's updates with its strategy (or the one given) into the model's next version.

    With publish=false the version is a draft until models.versions.publish.
    """
    await round_for_owner(ctx, p.round_id)
    return await aggregate_round(
        ctx.db,
        ctx.storage,
        p.round_id,
        strategy=p.strategy.name if p.strategy else None,
        params=p.strategy.params if p.strategy else None,
        min_updates=p.min_updates,
        publish=p.publish,
    )
