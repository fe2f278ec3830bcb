from __future__ import annotations

from datetime import datetime

from schemas._base import MutatingParams, Params, Result
from schemas._types import FederationId, ModelId


class ShareParams(MutatingParams, kw_only=True):
    """Share one of the owner's models into the federation (owner only); sharing twice is a no-op."""

    federation_id: FederationId
    model_id: ModelId


class SharedModel(Result, kw_only=True):
    id: str
    name: str
    org_id: str
    framework: str
    use_case: str
    description: str
    shared_at: datetime


class ListParams(Params, kw_only=True):
    """The models shared into the federation (members only)."""

    federation_id: FederationId


class ListResult(Result, kw_only=True):
    federation_id: str
    items: list[SharedModel]
    total: int
