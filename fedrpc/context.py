"""What a handler receives besides its params."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from fedrpc.auth import Authenticator, Principal, RateLimiter
from fedrpc.db import Database
from fedrpc.errors import Forbidden
from fedrpc.settings import Settings
from fedrpc.storage import Storage

if TYPE_CHECKING:
    from fedrpc.math_pool import MathPool
    from fedrpc.metrics import Metrics
    from fedrpc.registry import Registry


@dataclass(slots=True)
class Services:
    """App-wide resources, built once by the app's cleanup contexts."""

    settings: Settings
    db: Database
    storage: Storage
    auth: Authenticator
    registry: Registry
    limiter: RateLimiter
    metrics: Metrics
    math_pool: MathPool | None = None
    """Worker processes for heavy math (privacy accounting); set by the app's cleanup context."""


class Context(msgspec.Struct):
    """What a handler receives besides its params (a Struct: built in C, once per call)."""

    services: Services
    principal: Principal
    request_id: str
    transport: asyncio.BaseTransport | None = None
    """The connection the call arrived on, for ``rpc.discover``'s server URL (its local
    address, never the client's Host header); read only there, so other calls pay nothing."""

    @property
    def db(self) -> Database:
        return self.services.db

    @property
    def storage(self) -> Storage:
        return self.services.storage

    @property
    def settings(self) -> Settings:
        return self.services.settings

    @property
    def org_id(self) -> str:
        return self.principal.org_id

    @property
    def device_id(self) -> str:
        """The calling device; only methods callable by devices ask for it."""
        if self.principal.device_id is None:
            raise Forbidden("only a device may call this method")
        return self.principal.device_id
