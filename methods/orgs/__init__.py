"""orgs.*: the caller's organization (org creation is the admin CLI's job)."""

from __future__ import annotations

from fedrpc.context import Context
from fedrpc.registry import ORG, rpc_method
from fedrpc.services.policy import require_org
from schemas.orgs import GetParams, Org


@rpc_method(ORG)
async def get(ctx: Context, p: GetParams) -> Org:
    """The caller's organization."""
    require_org(ctx.principal, p.org_id or ctx.org_id)
    return await ctx.db.get("orgs.get_org", Org, org_id=ctx.org_id)
