from __future__ import annotations

from typing import Any

from schemas._base import Empty, Result


class DiscoverParams(Empty):
    """The OpenRPC 1.3.2 document describing every method."""


class DiscoverResult(Result):
    openrpc: str
    info: dict[str, Any]
    servers: list[dict[str, Any]]
    methods: list[dict[str, Any]]
    components: dict[str, Any]
