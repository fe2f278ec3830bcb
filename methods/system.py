"""system.*: liveness and version."""

from __future__ import annotations

from datetime import UTC, datetime

from fedrpc import __version__
from fedrpc.context import Context
from fedrpc.registry import ORG_OR_DEVICE, PUBLIC, rpc_method
from schemas.system import PingParams, PingResult, VersionParams, VersionResult


@rpc_method(ORG_OR_DEVICE)
async def ping(ctx: Context, p: PingParams) -> PingResult:
    """An authenticated no-op: proves the token works and the server answers."""
    return PingResult(pong=True, principal=ctx.principal.label, server_time=datetime.now(UTC))


_VERSION = VersionResult(version=__version__, openrpc="1.3.2")


@rpc_method(PUBLIC)
async def version_(ctx: Context, p: VersionParams) -> VersionResult:
    """The API's version and the OpenRPC revision of ``rpc.discover``; callable without a
    token, so it names nothing about the server's environment (no Python or library
    versions)."""
    return _VERSION
