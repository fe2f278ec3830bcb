from __future__ import annotations

from datetime import datetime

from schemas._base import Empty, Result


class PingParams(Empty):
    """Check that the service is up and the token is valid."""


class PingResult(Result):
    pong: bool
    principal: str
    server_time: datetime


class VersionParams(Empty):
    """The server's version and API revision."""


class VersionResult(Result):
    version: str
    openrpc: str
    python: str
    torch: str
