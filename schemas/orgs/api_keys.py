from __future__ import annotations

from datetime import datetime

from schemas._base import MutatingParams, Params, Result
from schemas._types import KeyId, Limit, Name, Offset


class CreateParams(MutatingParams):
    """Create an API key for the caller's organization; the token is shown once."""

    name: Name


class CreateResult(Result):
    id: str
    name: str
    token: str
    prefix: str
    created_at: datetime


class ListParams(Params):
    """The organization's API keys (never their tokens), newest first."""

    include_revoked: bool = False
    limit: Limit = 50
    offset: Offset = 0


class ApiKey(Result):
    id: str
    name: str
    prefix: str
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
