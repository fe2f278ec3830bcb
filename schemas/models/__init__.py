from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta

from schemas._base import MutatingParams, Params, Result
from schemas._types import Description, Limit, ModelId, Name, Offset

Framework = Literal["pytorch"]
UseCase = Annotated[str, Meta(max_length=128)]


class CreateParams(MutatingParams):
    """Create a model owned by the caller's organization."""

    name: Name
    framework: Framework = "pytorch"
    use_case: UseCase = ""
    description: Description = ""


class Model(Result):
    id: str
    org_id: str
    name: str
    framework: str
    use_case: str
    description: str
    created_at: datetime
    latest_version: int | None = None


class ListParams(Params):
    """The organization's models, newest first."""

    name: Name | None = None
    limit: Limit = 50
    offset: Offset = 0


class ListResult(Result):
    items: list[Model]
    total: int


class GetParams(Params):
    """One model with its latest version number."""

    model_id: ModelId
