"""devices.*: registration, lookup, listing and the device heartbeat.

``platform`` and ``network_type`` are closed vocabularies (enums in
rpc.discover) so that ``devices.list`` filters and round selection criteria
match exactly; a platform outside the list registers as ``other``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas._base import MutatingParams, Params, Result
from schemas._types import (
    Description,
    DeviceId,
    GroupId,
    Limit,
    Name,
    Offset,
    Percent,
    ShortText,
)

Platform = Literal["android", "ios", "linux", "windows", "macos", "web", "embedded", "other"]
NetworkType = Literal["wifi", "cellular", "ethernet", "none", "unknown"]
StorageMb = Annotated[
    int, Meta(ge=0, le=10**12, description="free storage in MB (10**12 MB is an exabyte)")
]
Seconds = Annotated[int, Meta(ge=1, le=366 * 86_400)]

STATE_MAX_BYTES = 16 * 1024
"""The largest reported ``state`` a device may send, measured as compact JSON."""
STATE_MAX_DEPTH = 32
"""How deeply objects and arrays may nest in ``state`` (the state object is level 1)."""

ReportedState = Annotated[
    dict[str, Any],
    Meta(
        description=f"free-form device state: at most {STATE_MAX_BYTES} bytes as compact JSON "
        f"and {STATE_MAX_DEPTH} levels of nesting"
    ),
]


def nesting_depth(value: Any) -> int:
    """Levels of dicts and lists in a decoded JSON value, counted without recursion."""
    depth, level = 0, [value]
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            break
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return depth


class Capabilities(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a device can offer right now: power, network and free storage.

    Each field is optional: a device reports what it knows. An unknown value
    never meets a selection criterion on it (``min_battery`` skips a device of
    unknown battery) and is filled in by a later ``devices.sync``.
    """

    battery_pct: Percent | None = None
    charging: bool | None = None
    network_type: NetworkType | None = None
    available_storage_mb: StorageMb | None = None


class RegisterParams(MutatingParams):
    """Register a device for the caller's organization; its token is shown once.

    With an admin key, ``device_group_ids`` names the organization's groups to
    join. With an enrollment key, the device joins the key's groups, and
    ``device_group_ids`` may only repeat some of them.
    """

    platform: Platform
    os_version: ShortText
    model: Name
    app_version: ShortText
    capabilities: Capabilities = msgspec.field(default_factory=Capabilities)
    device_group_ids: Annotated[list[GroupId], Meta(max_length=100)] = []


class Device(Result):
    """A device as the server knows it: what it registered and what it last reported."""

    id: str
    org_id: str
    platform: str
    os_version: str
    model: str
    app_version: str
    battery_pct: int | None
    charging: bool | None
    network_type: str | None
    available_storage_mb: int | None
    state: dict[str, Any]
    group_ids: list[str]
    registered_at: datetime
    last_seen_at: datetime
    revoked_at: datetime | None = None
    revoke_reason: str | None = None


class RegisterResult(Result):
    device_id: str
    token: str
    device: Device


class GetParams(Params):
    """One device: an organization reads its own devices, a device reads only itself."""

    device_id: DeviceId


class ListParams(Params):
    """The organization's devices, newest first, filtered by what they last reported."""

    platform: Platform | None = None
    network_type: NetworkType | None = None
    charging: bool | None = None
    min_battery: Percent | None = None
    device_group_id: GroupId | None = None
    seen_within_seconds: Seconds | None = None
    limit: Limit = 50
    offset: Offset = 0


class ListResult(Result):
    items: list[Device]
    total: int


class SyncParams(Params):
    """Heartbeat: report the device's state and learn what the server wants from it.

    Fields left out (or null) keep their stored value; ``state`` replaces the
    stored state as a whole.
    """

    battery_pct: Percent | None = None
    charging: bool | None = None
    network_type: NetworkType | None = None
    available_storage_mb: StorageMb | None = None
    app_version: ShortText | None = None
    state: ReportedState | None = None

    def __post_init__(self) -> None:
        # A deep state would be stored fine and then break every reader near the recursion limit.
        if self.state is not None and nesting_depth(self.state) > STATE_MAX_DEPTH:
            raise ValueError(f"state may nest at most {STATE_MAX_DEPTH} levels deep")


class RoundOffer(Result, kw_only=True):
    """A running round the device is selected in: what to download, how to train, until when."""

    round_id: str
    model_id: str
    base_version: int
    weights_url: str
    weights_sha256: str
    weights_size_bytes: int
    update_format: str
    strategy: str
    client_config: dict[str, Any]
    deadline: datetime
    # None when the round has none; present on the wire as null so devices need not guess.
    differential_privacy: dict[str, Any] | None
    secure_aggregation: dict[str, Any] | None
    # What the device may claim: sample_count above the cap is refused at upload;
    # with a max_update_norm, an update whose delta's L2 norm exceeds it is refused.
    max_sample_count: int
    max_update_norm: float | None


class StopRound(Result, kw_only=True):
    """A round the device must stop working on (cancelled or failed)."""

    round_id: str
    state: str
    reason: str | None


class DesiredState(Result):
    """What the server asks of the device."""

    round_offers: list[RoundOffer]
    stop_rounds: list[StopRound]


class SyncResult(Result):
    device_id: str
    server_time: datetime
    next_poll_interval_seconds: int
    desired_state: DesiredState


class RevokeParams(MutatingParams):
    """Revoke one of the organization's devices: its token stops working for good.

    At once on the serving process and within ``auth_cache_seconds`` on every
    other; the device is never selected again and cannot upload. Revoking twice
    keeps the first time and reason.
    """

    device_id: DeviceId
    reason: Description | None = None


class RevokeResult(Result):
    device_id: str
    revoked_at: datetime
    revoke_reason: str | None = None


class RotateTokenParams(MutatingParams):
    """Replace the calling device's token: the new one is shown once, the old one is dead.

    Called with the device's current token, which stops working at once on the
    serving process and within ``auth_cache_seconds`` on every other; a token
    that was already rotated cannot rotate again.
    """


class RotateTokenResult(Result):
    device_id: str
    token: str


class EnrollmentClaim(msgspec.Struct):
    """An enrollment key's answer to one more registration (internal, not on the wire)."""

    id: str
    claimed: bool
    revoked: bool
    expired: bool
    device_group_ids: list[str]


class Owner(msgspec.Struct):
    """A row naming the organization that owns an id (internal, not on the wire)."""

    id: str
    org_id: str
