"""system.*: liveness and version."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from importlib.metadata import version

from fedrpc import __version__
from fedrpc.context import Context
from fedrpc.registry import ORG_OR_DEVICE, PUBLIC, rpc_method
from schemas.system import PingParams, PingResult, VersionParams, VersionResult


@rpc_method(ORG_OR_DEVICE)
async def ping(ctx: Context, p: PingParams) -> PingResult:
    """An authenticated no-op: proves the token works and the server answers."""
    return PingResult(pong=True, principal=ctx.principal.label, server_time=datetime.now(UTC))


@rpc_method(PUBLIC)
async def version_(ctx: Context, p: VersionParams) -> VersionResult:
    """The server's version; callable without a token."""
    return VersionResult(
        version=__version__,
        openrpc="1.3.2",
        python=platform.python_version(),
        torch=version("torch"),
    )
