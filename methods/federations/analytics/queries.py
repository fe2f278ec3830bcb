"""federations.analytics.queries.*: the record of every analytics question, failed ones too."""

from __future__ import annotations

from fedrpc.context import Context
from fedrpc.registry import ORG, rpc_method
from schemas.federations.analytics.queries import GetParams, ListParams, ListResult, Query


@rpc_method(ORG)
async def list_(ctx: Context, p: ListParams) -> ListResult:
    """Questions of the federations the caller's organization owns or is an active member of."""
    where = {"org_id": ctx.org_id, "federation_id": p.federation_id}
    queries = await ctx.db.all(
        "federations.analytics.queries.list_queries", Query, **where, limit=p.limit, offset=p.offset
    )
    total = await ctx.db.value("federations.analytics.queries.count_queries", **where)
    return ListResult(queries=queries, total=total)


@rpc_method(ORG)
async def get(ctx: Context, p: GetParams) -> Query:
    """One question with its params, status, result or error; `not_found` outside the caller's
    federations."""
    return await ctx.db.get(
        "federations.analytics.queries.find_query",
        Query,
        query_id=p.query_id,
        org_id=ctx.org_id,
        missing="no analytics query with this id",
    )
