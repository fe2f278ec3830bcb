"""rpc.discover: the service description (also served at GET /openrpc.json)."""

from __future__ import annotations

from fedrpc.context import Context
from fedrpc.openrpc import document_for, server_url
from fedrpc.registry import PUBLIC, rpc_method
from schemas.rpc import DiscoverParams, DiscoverResult


@rpc_method(PUBLIC)
async def discover(ctx: Context, p: DiscoverParams) -> DiscoverResult:
    """The OpenRPC 1.3.2 document generated from the registry and the Structs."""
    url = server_url(ctx.settings, ctx.transport)
    return document_for(ctx.services.registry).typed(DiscoverResult, url)
