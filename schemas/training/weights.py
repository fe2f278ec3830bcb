from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta

from schemas._base import MutatingParams, Result
from schemas._types import ModelId, RoundId, Version
from schemas.models.versions import Payload, StateEncoding

MetricName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
# JSON has no NaN, and the bounds keep 1e999 (inf) out: every metric is finite.
MetricValue = Annotated[float, Meta(ge=-1e12, le=1e12)]
SampleCount = Annotated[int, Meta(ge=1, le=1_000_000_000_000)]


class UploadParams(MutatingParams, kw_only=True):
    """Upload this device's update for a running round it was selected for."""

    round_id: RoundId
    model_id: ModelId
    version: Version
    sample_count: Annotated[
        SampleCount,
        Meta(description="Examples trained on; at most the round's `max_sample_count` (offered)."),
    ]
    update_format: Literal["delta", "weights"] = "delta"
    encoding: Annotated[
        StateEncoding,
        Meta(description='Devices send "safetensors"; "torch" is refused for device updates.'),
    ] = "safetensors"
    weights: Payload
    metrics: Annotated[
        dict[MetricName, MetricValue],
        Meta(
            max_length=32,
            description=(
                "Training metrics of this update; `loss` and `accuracy` are indexed. Names the "
                "server reports itself (`dp_*`, `server_*`, `secagg_*`, `num_clipped`, ...) "
                "are refused."
            ),
        ),
    ] = {}


class Update(Result, kw_only=True):
    """An accepted update's metadata (its bytes stay in the artifact store)."""

    # No defaults: a missing loss or accuracy is shown as null, not omitted.
    id: str
    round_id: str
    device_id: str
    org_id: str
    model_id: str
    version: int
    sample_count: int
    update_format: str
    encoding: str
    sha256: str
    size_bytes: int
    metrics: dict[str, Any]
    loss: float | None
    accuracy: float | None
    received_at: datetime
