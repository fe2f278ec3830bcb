"""orgs.api_keys.*: an organization's API keys and their scopes.

An ``admin`` key does everything the organization may do. An ``enroll`` key
is what a device app ships: it may call ``devices.register`` and nothing else,
puts every device it registers into the groups it is bound to, stops working
``expires_in_seconds`` after its creation and after ``max_devices``
registrations.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta

from schemas._base import MutatingParams, Params, Result
from schemas._types import GroupId, KeyId, Limit, Name, Offset

Scope = Literal["admin", "enroll"]
ExpiresIn = Annotated[
    int, Meta(ge=1, le=3 * 366 * 86_400, description="lifetime in seconds (at most three years)")
]
MaxDevices = Annotated[int, Meta(ge=1, le=1_000_000_000)]


class CreateParams(MutatingParams):
    """Create an API key for the caller's organization; the token is shown once.

    ``scope`` is ``admin`` (the default: everything the organization may do) or
    ``enroll`` (``devices.register`` only). ``device_group_ids``,
    ``expires_in_seconds`` and ``max_devices`` bind an enrollment key; they are
    refused for an admin key. No expiry or maximum means none.
    """

    name: Name
    scope: Scope = "admin"
    device_group_ids: Annotated[list[GroupId], Meta(max_length=100)] = []
    expires_in_seconds: ExpiresIn | None = None
    max_devices: MaxDevices | None = None

    def __post_init__(self) -> None:
        bound = self.device_group_ids or self.expires_in_seconds or self.max_devices
        if self.scope == "admin" and bound:
            raise ValueError(
                "device_group_ids, expires_in_seconds and max_devices apply to enroll keys only"
            )


class CreateResult(Result):
    id: str
    name: str
    token: str
    prefix: str
    scope: str
    device_group_ids: list[str]
    expires_at: datetime | None
    max_devices: int | None
    created_at: datetime


class ListParams(Params):
    """The organization's API keys (never their tokens), newest first."""

    include_revoked: bool = False
    limit: Limit = 50
    offset: Offset = 0


class ApiKey(Result):
    """A key as listed: its scope, its bounds and how many devices it registered so far."""

    id: str
    name: str
    prefix: str
    scope: str
    device_group_ids: list[str]
    expires_at: datetime | None
    max_devices: int | None
    devices_registered: int
    created_at: datetime
    revoked_at: datetime | None = None


class ListResult(Result):
    items: list[ApiKey]
    total: int


class RevokeParams(MutatingParams):
    """Revoke an API key at once; calls with it fail from then on."""

    key_id: KeyId


class RevokeResult(Result):
    id: str
    revoked_at: datetime
