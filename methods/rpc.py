"""rpc.discover: the service description (also served at GET /openrpc.json)."""

from __future__ import annotations

import msgspec

from fedrpc.context import Context
from fedrpc.openrpc import build_document
from fedrpc.registry import PUBLIC, rpc_method
from schemas.rpc import DiscoverParams, DiscoverResult


@rpc_method(PUBLIC)
async def discover(ctx: Context, p: DiscoverParams) -> DiscoverResult:
    """The OpenRPC 1.3.2 document generated from the registry and the Structs."""
    return msgspec.convert(build_document(ctx.services.registry), DiscoverResult)
