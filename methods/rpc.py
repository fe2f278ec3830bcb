"""rpc.discover: the service description (also served at GET /openrpc.json)."""

from __future__ import annotations

from typing import cast

import msgspec

from fedrpc.context import Context
from fedrpc.openrpc import document_for, server_url
from fedrpc.registry import PUBLIC, rpc_method
from schemas.rpc import DiscoverParams, DiscoverResult


@rpc_method(PUBLIC)
async def discover(ctx: Context, p: DiscoverParams) -> DiscoverResult:
    """The OpenRPC 1.3.2 document generated from the registry and the Structs.

    The document the app built once, already encoded, with this connection's server URL
    spliced in (the same bytes as ``GET /openrpc.json``): a call costs a copy, not a
    conversion and an encoding of the whole document.
    """
    url = server_url(ctx.settings, ctx.transport)
    encoded = document_for(ctx.services.registry).encoded(url)
    return cast(DiscoverResult, msgspec.Raw(encoded))  # encoded as is, a DiscoverResult's JSON
