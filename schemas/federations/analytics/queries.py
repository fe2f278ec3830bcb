"""federations.analytics.queries.*: the record of every question asked, failed ones too."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from msgspec import Meta

from schemas._base import Params, Result
from schemas._types import FederationId, Limit, Offset

QueryId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^anq_[0-9a-f]{32}$")]


class ListParams(Params, kw_only=True):
    """Questions asked in the caller's federations (or one of them), newest first."""

    federation_id: FederationId | None = None
    limit: Limit = 50
    offset: Offset = 0


class Query(Result, kw_only=True):
    id: str
    federation_id: str
    query_type: str
    params: dict[str, Any]
    status: str
    result: dict[str, Any] | None = None
    error_message: str | None = None
    created_at: datetime
    completed_at: datetime | None = None


class ListResult(Result, kw_only=True):
    queries: list[Query]
    total: int


class GetParams(Params, kw_only=True):
    """One recorded question, if the caller's organization is a member of its federation."""

    query_id: QueryId
