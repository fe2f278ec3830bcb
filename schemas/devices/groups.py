"""devices.groups.*: named sets of an organization's devices."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from msgspec import Meta

from schemas._base import MutatingParams, Params, Result
from schemas._types import Description, DeviceId, GroupId, Limit, Name, Offset


class CreateParams(MutatingParams):
    """Create a device group; names are unique within the organization."""

    name: Name
    description: Description = ""


class Group(Result):
    id: str
    name: str
    description: str
    member_count: int
    created_at: datetime


class ListParams(Params):
    """The organization's device groups with their member counts, newest first."""

    limit: Limit = 50
    offset: Offset = 0


class ListResult(Result):
    items: list[Group]
    total: int


class AddDevicesParams(MutatingParams):
    """Add devices to a group; devices already in it are left as they are."""

    group_id: GroupId
    device_ids: Annotated[list[DeviceId], Meta(min_length=1, max_length=1000)]


class AddDevicesResult(Result):
    group_id: str
    added: int
    member_count: int
