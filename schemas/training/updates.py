"""training.updates.*: what has arrived for a model.

An organization sees its own devices' rows; every organization whose devices
took part in a round it may read (its own included) appears in `participation`
as an `OrgUpdates` count (docs/design.md, "What another organization sees").
"""

from __future__ import annotations

from datetime import datetime

from schemas._base import Params, Result
from schemas._types import Limit, ModelId, Offset, Version
from schemas.training.weights import Update


class OrgDevices(Result, kw_only=True):
    """One organization's part, as a count: never its device ids or per-device values."""

    org_id: str
    devices: int


class OrgUpdates(OrgDevices, kw_only=True):
    """One organization's part in a model's updates: how many of its devices sent how many updates."""

    updates: int


class ListParams(Params, kw_only=True):
    """Metadata of the updates made by the caller's own devices for a model, newest first."""

    model_id: ModelId
    version: Version | None = None
    limit: Limit = 50
    offset: Offset = 0


class ListResult(Result, kw_only=True):
    items: list[Update]
    total: int
    participation: list[OrgUpdates]


class StatsParams(Params, kw_only=True):
    """Update count, sample total and latest arrival over every round of the model the caller can read."""

    model_id: ModelId
    version: Version | None = None


class Stats(Result, kw_only=True):
    # No defaults: zero counts and a null time are shown, not omitted.
    model_id: str
    version: int | None
    update_count: int
    total_samples: int
    last_received_at: datetime | None
    participation: list[OrgUpdates]


class ByDeviceParams(Params, kw_only=True):
    """Update counts and sample totals per device of the caller's organization, most recently active first."""

    model_id: ModelId
    version: Version | None = None
    limit: Limit = 50
    offset: Offset = 0


class DeviceContribution(Result, kw_only=True):
    device_id: str
    update_count: int
    total_samples: int
    last_received_at: datetime


class ByDeviceResult(Result, kw_only=True):
    items: list[DeviceContribution]
    total: int
    participation: list[OrgUpdates]
