from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta

from schemas._base import MutatingParams, Result
from schemas._types import Sha256

Purpose = Literal["model_artifact", "weights", "personalization", "secagg_vector"]


class CreateParams(MutatingParams):
    """A presigned PUT URL for a large payload; later calls name the upload_id instead of inline bytes."""

    purpose: Purpose
    size_bytes: Annotated[int, Meta(ge=1)]
    sha256: Sha256


class CreateResult(Result):
    upload_id: str
    url: str
    method: str
    size_bytes: int
    sha256: str
    expires_at: datetime
