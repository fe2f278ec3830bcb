"""federations.*: create, list, invite, join and inspect cross-organization federations."""

from __future__ import annotations

from fedrpc.auth import new_id
from fedrpc.context import Context
from fedrpc.db import jsonb
from fedrpc.errors import Forbidden, NotFound
from fedrpc.registry import ORG, rpc_method
from fedrpc.services.policy import (
    federation_for_member,
    federation_for_owner,
    federation_role,
    require_org,
)
from schemas.federations import (
    AnalyticsPolicy,
    CreateParams,
    Federation,
    GetParams,
    InviteParams,
    InviteResult,
    JoinParams,
    ListParams,
    ListResult,
    Member,
    Membership,
    MembersParams,
    MembersResult,
)


@rpc_method(ORG)
async def create(ctx: Context, p: CreateParams) -> Federation:
    """Create a federation; the caller's organization owns it and is its first active member."""
    require_org(ctx.principal, p.org_id)
    policy = p.privacy_policy
    analytics = p.analytics_policy or AnalyticsPolicy()
    async with ctx.db.transaction() as tx:
        federation = await tx.get(
            "federations.insert_federation",
            Federation,
            id=new_id("fed"),
            name=p.name,
            description=p.description,
            owner_org_id=ctx.org_id,
            total_epsilon_budget=policy.total_epsilon_budget if policy else None,
            total_delta_budget=policy.total_delta_budget if policy else None,
            min_round_updates=p.min_round_updates,
            analytics_min_group_size=analytics.min_group_size,
            analytics_allow_min_max=analytics.allow_min_max,
            analytics_variables=None if analytics.variables is None else jsonb(analytics.variables),
        )
        await tx.run(
            "federations.insert_owner_membership",
            id=new_id("inv"),
            federation_id=federation.id,
            org_id=ctx.org_id,
        )
    return federation


@rpc_method(ORG)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """The federations the caller's organization owns or is an active member of."""
    require_org(ctx.principal, p.org_id or ctx.org_id)
    args = {"org_id": ctx.org_id, "name": p.name}
    items = await ctx.db.all(
        "federations.list_federations", Federation, limit=p.limit, offset=p.offset, **args
    )
    return ListResult(
        items=items, total=await ctx.db.value("federations.count_federations", **args)
    )


@rpc_method(ORG)
async def get(ctx: Context, p: GetParams) -> Federation:
    """One federation, for its owner and active members."""
    return await federation_for_member(ctx, p.federation_id)


@rpc_method(ORG)
async def invite(ctx: Context, p: InviteParams) -> InviteResult:
    """Invite organizations (owner only); inviting twice returns the existing invitation."""
    await federation_for_owner(ctx, p.federation_id)
    if await ctx.db.value("federations.count_orgs", org_ids=p.org_ids) != len(set(p.org_ids)):
        raise NotFound("one of org_ids is not an organization")
    rows = await ctx.db.all(
        "federations.upsert_invitations",
        Membership,
        federation_id=p.federation_id,
        org_ids=p.org_ids,
    )
    return InviteResult(invitations=rows)


@rpc_method(ORG)
async def join(ctx: Context, p: JoinParams) -> Membership:
    """Accept the invitation of the caller's own organization; joining twice is a no-op."""
    require_org(ctx.principal, p.org_id)
    found = await federation_role(ctx, p.federation_id)
    if found.role == "none":
        raise Forbidden("the organization has not been invited to this federation")
    return await ctx.db.get(
        "federations.update_membership_joined",
        Membership,
        federation_id=p.federation_id,
        org_id=ctx.org_id,
    )


@rpc_method(ORG)
async def members(ctx: Context, p: MembersParams) -> MembersResult:
    """Every member with contribution statistics from the federation's completed rounds
    without differential privacy (docs/privacy.md, "What round views still reveal").

    Running, failed and cancelled rounds and every DP round contribute nothing, so polling
    this view never tells one upload apart. `rounds_contributed` counts the completed non-DP
    rounds an organization sent updates to, `last_contribution_at` is when the latest of
    them finished. An organization's updates in such a round enter its `total_samples`,
    `avg_loss` and `avg_accuracy` (sample-weighted) only if it sent at least the
    federation's `min_round_updates` of them to that round, so each step of its totals
    mixes that many of its updates; with no such round the three are null.
    """
    await federation_for_member(ctx, p.federation_id)
    rows = await ctx.db.all("federations.list_members", Member, federation_id=p.federation_id)
    return MembersResult(federation_id=p.federation_id, members=rows)
