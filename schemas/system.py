from __future__ import annotations

from datetime import datetime
from typing import Annotated

from msgspec import Meta

from schemas._base import Empty, Result


class PingParams(Empty):
    """Check that the service is up and the token is valid."""


class PingResult(Result):
    pong: bool
    principal: str
    server_time: datetime


class VersionParams(Empty):
    """The API's version and the OpenRPC revision of its description."""


class VersionResult(Result):
    """Only the API's own versions: nothing about the server's environment."""

    version: Annotated[str, Meta(description="The API version (the fedrpc release).")]
    openrpc: Annotated[str, Meta(description="The OpenRPC revision rpc.discover follows.")]
