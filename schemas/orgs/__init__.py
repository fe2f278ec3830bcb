from __future__ import annotations

from datetime import datetime

from schemas._base import Params, Result
from schemas._types import OrgId


class GetParams(Params):
    """The caller's organization."""

    org_id: OrgId | None = None


class Org(Result):
    id: str
    name: str
    created_at: datetime
