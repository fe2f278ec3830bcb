"""training.personalized.*: a device's personalized state per (model, federation).

An organization reads its own devices' states only; in a federation, every
member appears in `participation` as an `OrgDevices` count (docs/design.md,
"What another organization sees").
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta

from schemas._base import MutatingParams, Params, Result
from schemas._types import DeviceId, FederationId, Limit, ModelId, Offset
from schemas.models.versions import Payload, StateEncoding
from schemas.training.device_jobs import Numbers
from schemas.training.updates import OrgDevices

PersonalizationType = Literal["ditto", "fedper", "local_finetune"]
TensorName = Annotated[str, Meta(min_length=1, max_length=256)]
MAX_HEAD_LAYERS = 1000
ObjectKey = Annotated[str, Meta(min_length=1, max_length=512)]


class UpdateParams(MutatingParams, kw_only=True):
    """Create or replace this device's personalized state for a model (and federation).

    The state is replaced as a whole. `weights` stores new weights; `weights_key`
    keeps the weights already stored (it must be the current state's key);
    giving neither stores a state without weights.
    """

    model_id: ModelId
    federation_id: FederationId | None = None
    personalization_type: PersonalizationType
    weights: Payload | None = None
    weights_encoding: StateEncoding = "safetensors"
    weights_key: ObjectKey | None = None
    metrics: Numbers = {}
    head_layers: Annotated[list[TensorName], Meta(max_length=MAX_HEAD_LAYERS)] = []
    round_number: Annotated[int, Meta(ge=0, le=1_000_000_000)] | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and self.weights_key is not None:
            raise ValueError(
                "give weights (new ones) or weights_key (keep the stored ones), not both"
            )
        if len(set(self.head_layers)) != len(self.head_layers):
            raise ValueError("head_layers names a tensor twice")
        if self.personalization_type == "fedper" and not self.head_layers:
            raise ValueError("fedper needs head_layers: the tensors kept on the device")


class PersonalizedState(Result, kw_only=True):
    """One device's personalized state; fields without a value are null, not omitted."""

    device_id: str
    model_id: str
    federation_id: str | None
    personalization_type: PersonalizationType
    weights_key: str | None
    weights_sha256: str | None
    weights_size_bytes: int | None
    metrics: dict[str, Any]
    head_layers: list[str]
    round_number: int | None
    created_at: datetime
    updated_at: datetime


class UpdateResult(Result, kw_only=True):
    created: bool
    state: PersonalizedState


class GetParams(Params, kw_only=True):
    """A personalized state: a device reads its own; an organization names one of its own devices."""

    model_id: ModelId
    federation_id: FederationId | None = None
    device_id: DeviceId | None = None


class GetResult(Result, kw_only=True):
    state: PersonalizedState | None
    has_personalized_weights: bool
    weights_url: str | None = None
    weights_url_expires_at: datetime | None = None


class MetricsParams(Params, kw_only=True):
    """The metrics of a personalized state, without its weights."""

    model_id: ModelId
    federation_id: FederationId | None = None
    device_id: DeviceId | None = None


class MetricsResult(Result, kw_only=True):
    """`metrics` is null when the device has no state for the model (and federation)."""

    device_id: str
    model_id: str
    federation_id: str | None
    personalization_type: PersonalizationType | None
    metrics: dict[str, Any] | None
    round_number: int | None
    updated_at: datetime | None


class ListParams(Params, kw_only=True):
    """The organization's own devices' personalized states (in a federation, or in none), latest per device."""

    federation_id: FederationId | None = None
    model_id: ModelId | None = None
    limit: Limit = 50
    offset: Offset = 0


class ListResult(Result, kw_only=True):
    """`items`: the caller's own devices; `participation`: per organization, how many of its
    devices hold a state (every member of the federation; without one, the caller's own)."""

    items: list[PersonalizedState]
    total: int
    participation: list[OrgDevices]
