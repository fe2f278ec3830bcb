"""training.*: the lifecycle of a federated round from the server's side."""

from __future__ import annotations

from fedrpc.context import Context
from fedrpc.registry import ORG, rpc_method
from fedrpc.services.policy import (
    counts_as_seen_by,
    model_for_round,
    own_groups,
    progress_as_seen_by,
    round_as_seen_by,
    round_for_owner,
    round_for_reading,
    round_min_updates,
    version_to_train_from,
)
from fedrpc.services.round_aggregation import aggregate_round
from fedrpc.services.rounds import insert_round, transition
from fedrpc.services.selection import select_for_round
from schemas.models.versions import ModelVersion
from schemas.training import (
    AggregateParams,
    CancelRoundParams,
    CreateRoundParams,
    GetRoundParams,
    ListRoundsParams,
    ListRoundsResult,
    OrgParticipation,
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
    """Create a round in state pending on one of the caller's models (in a federation: one
    shared into it, under the federation's rules)."""
    model, federation = await model_for_round(ctx, p.model_id, p.federation_id)
    min_updates = round_min_updates(p, federation)
    await version_to_train_from(ctx, model, p.base_version)
    round_id = await insert_round(ctx.db, ctx.org_id, p, min_updates)
    return await get_round(ctx, GetRoundParams(round_id=round_id))


@rpc_method(ORG)
async def get_round(ctx: Context, p: GetRoundParams) -> RoundDetail:
    """A round with the caller's own devices selected for it and every organization's counts."""
    found = round_as_seen_by(ctx, await round_for_reading(ctx, p.round_id))
    devices, participation = await _own_devices_and_counts(ctx, found)
    fields = {f: getattr(found, f) for f in Round.__struct_fields__}
    return RoundDetail(**fields, selected_devices=devices, participation=participation)


async def _own_devices_and_counts(ctx: Context, rnd: Round):
    devices = await ctx.db.column("training.list_round_devices", round_id=rnd.id, org_id=ctx.org_id)
    counts = await ctx.db.all(
        "training.list_round_participation", OrgParticipation, round_id=rnd.id
    )
    return devices, counts_as_seen_by(ctx, rnd, counts)


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
    return ListRoundsResult(
        items=[round_as_seen_by(ctx, r) for r in items],
        total=await ctx.db.value("training.count_rounds", **args),
    )


@rpc_method(ORG)
async def get_round_progress(ctx: Context, p: ProgressParams) -> Progress:
    """Selected and received counts, samples and time left: one query, for polling."""
    rnd = await round_for_reading(ctx, p.round_id)
    progress = await ctx.db.get("training.get_round_progress", Progress, round_id=p.round_id)
    return progress_as_seen_by(rnd, progress)


@rpc_method(ORG)
async def select_devices(ctx: Context, p: SelectDevicesParams) -> SelectDevicesResult:
    """Pick devices for a pending round uniformly at random (seeded; the seed is recorded); a
    private round's by Poisson sampling, charged to its federation's ledger as it is drawn."""
    rnd = await round_for_owner(ctx, p.round_id)
    if p.criteria.device_group_id is not None:
        await own_groups(ctx.db, ctx.org_id, [p.criteria.device_group_id])
    org_ids = [rnd.org_id]
    if rnd.federation_id is not None:
        org_ids = await ctx.db.column("training.list_member_orgs", federation_id=rnd.federation_id)
    chosen = await select_for_round(
        ctx.db, p.round_id, org_ids, p.criteria, pool=ctx.services.math_pool
    )
    devices, participation = await _own_devices_and_counts(ctx, rnd)
    return SelectDevicesResult(
        round_id=p.round_id,
        state="selected",
        selected=devices,
        selected_count=None if rnd.dp_config else len(chosen.chosen),
        participation=participation,
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
    """Cancel a round; devices are told to stop and its updates are never aggregated.

    An aggregation in flight is discarded: it publishes no version and deletes what it wrote.
    """
    await round_for_owner(ctx, p.round_id)
    await transition(
        ctx.db,
        "training.update_round_cancelled",
        p.round_id,
        ("pending", "selected", "running", "aggregating"),
        reason=p.reason,
    )
    return await get_round(ctx, GetRoundParams(round_id=p.round_id))


@rpc_method(ORG)
async def aggregate(ctx: Context, p: AggregateParams) -> ModelVersion:
    """Combine the round's updates with its strategy (or the one given) into the model's next version.

    With publish=false the version is a draft until models.versions.publish. The call claims
    the round (running -> aggregating), which fixes its updates: a later upload is refused.
    A round cancelled meanwhile, or taken over by another call after this one's lease ran
    out, gets nothing from this call: `conflict` with `data.state`.
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
        lease_seconds=ctx.settings.aggregation_lease_seconds,
    )
