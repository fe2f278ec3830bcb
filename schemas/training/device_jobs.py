"""training.device_jobs.*: a device's own record of the work it does for a round or for itself."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta

from schemas._base import MutatingParams, Result
from schemas._types import ModelId, RoundId, Sha256, Version

JobType = Literal["federated", "personalization"]
JobState = Literal["queued", "downloading", "training", "uploading", "completed", "failed"]
JobId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^job_[0-9a-f]{32}$")]

MAX_NUMBERS = 32
"""The most entries a progress or metrics map may hold."""

NumberName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
# JSON has no NaN, and the bounds keep 1e999 (inf) and absurd magnitudes out: every value is finite.
# Integers stay integers (an epoch count reads back as 3, not 3.0).
Number = Annotated[int, Meta(ge=-(10**12), le=10**12)] | Annotated[float, Meta(ge=-1e12, le=1e12)]
Numbers = Annotated[
    dict[NumberName, Number],
    Meta(
        max_length=MAX_NUMBERS,
        description=f"at most {MAX_NUMBERS} named finite numbers (|x| <= 1e12)",
    ),
]
ErrorText = Annotated[str, Meta(min_length=1, max_length=2000)]
ObjectKey = Annotated[str, Meta(min_length=1, max_length=512)]


class CreateParams(MutatingParams, kw_only=True):
    """Open a job for this device: federated (for a round it is selected in) or personalization."""

    job_type: JobType
    round_id: RoundId | None = None
    model_id: ModelId
    base_version: Version

    def __post_init__(self) -> None:
        if self.job_type == "federated" and self.round_id is None:
            raise ValueError(
                "a federated job needs the round_id of a round the device is selected in"
            )
        if self.job_type == "personalization" and self.round_id is not None:
            raise ValueError("a personalization job belongs to no round: leave round_id out")


class UpdateStatusParams(MutatingParams, kw_only=True):
    """Report a job's progress or move it along queued -> downloading -> training -> uploading, or to failed."""

    job_id: JobId
    state: JobState
    progress: Numbers | None = None
    last_error: ErrorText | None = None


class CompleteParams(MutatingParams, kw_only=True):
    """Finish an uploading job with its final metrics (and the key of a stored adapter, if any)."""

    job_id: JobId
    metrics: Numbers = {}
    adapter_key: ObjectKey | None = None
    adapter_sha256: Sha256 | None = None

    def __post_init__(self) -> None:
        if self.adapter_sha256 is not None and self.adapter_key is None:
            raise ValueError("adapter_sha256 needs adapter_key")


class Job(Result, kw_only=True):
    """A device job; fields without a value are null, not omitted."""

    id: str
    device_id: str
    job_type: JobType
    round_id: str | None
    model_id: str
    base_version: int
    state: JobState
    progress: dict[str, Any]
    last_error: str | None
    metrics: dict[str, Any] | None
    adapter_key: str | None
    adapter_sha256: str | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
