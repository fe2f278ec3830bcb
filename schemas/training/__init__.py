from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta, field

from schemas._base import MutatingParams, Params, Result
from schemas._types import (
    FederationId,
    GroupId,
    Limit,
    ModelId,
    Offset,
    Percent,
    RoundId,
    RoundNoiseMultiplier,
    Version,
)

RoundState = Literal[
    "pending", "selected", "running", "aggregating", "completed", "cancelled", "failed"
]
StrategyName = Literal[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadagrad",
    "fedadam",
    "fedyogi",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
]
Finite = Annotated[float, Meta(ge=-1e12, le=1e12)]
Reason = Annotated[str, Meta(min_length=1, max_length=512)]
AppVersion = Annotated[str, Meta(pattern=r"^\d+(\.\d+){0,3}$", max_length=32)]


class Strategy(Params, kw_only=True):
    """How the server combines updates, and the strategy's parameters (see docs/aggregation.md)."""

    name: StrategyName = "fedavg"
    params: dict[str, Finite] = {}


class ClientConfig(Params, kw_only=True):
    """Hyperparameters the devices train with."""

    epochs: Annotated[int, Meta(ge=1, le=1000)] = 1
    batch_size: Annotated[int, Meta(ge=1, le=65536)] = 32
    learning_rate: Annotated[float, Meta(gt=0, le=100)] = 0.01
    proximal_mu: Annotated[float, Meta(ge=0, le=1e6)] = 0.0


class DpConfig(Params, kw_only=True):
    """Central differential privacy applied at aggregation."""

    noise_multiplier: RoundNoiseMultiplier
    clipping_norm: Annotated[float, Meta(gt=0, le=1e6)]


class SecAggConfig(Params, kw_only=True):
    """SecAgg+ parameters (docs/secagg.md); k and t default from the cohort size and the
    tolerated dropout and collusion fractions."""

    threshold: (
        Annotated[
            int,
            Meta(ge=2, description="Shamir threshold t; default from the cohort (docs/secagg.md)."),
        ]
        | None
    ) = None
    neighbours: Annotated[int, Meta(ge=2)] | None = None
    dropout_fraction: Annotated[
        float, Meta(ge=0, le=0.9, description="Share of devices the defaults tolerate dropping.")
    ] = 1 / 3
    corruption_fraction: Annotated[
        float, Meta(ge=0, le=0.5, description="Share of colluding devices the defaults resist.")
    ] = 0.05
    stage_seconds: Annotated[
        int, Meta(ge=1, le=86400, description="Deadline of each SecAgg+ stage.")
    ] = 300
    min_survivors: (
        Annotated[
            int,
            Meta(
                ge=3,
                description="Fewest devices a stage may end with (default max(3, t, min_updates)).",
            ),
        ]
        | None
    ) = None
    clip: Annotated[
        float, Meta(gt=0, le=1e6, description="Each update value is clipped to [-clip, clip].")
    ] = 1.0
    quantization_bits: Annotated[int, Meta(ge=1, le=32)] = 16


class CreateRoundParams(MutatingParams, kw_only=True):
    """Create a training round in state `pending`."""

    model_id: ModelId
    base_version: Version
    federation_id: FederationId | None = None
    target_device_count: Annotated[int, Meta(ge=1, le=100_000)]
    min_updates: Annotated[int, Meta(ge=1, le=100_000)] = 1
    deadline_seconds: Annotated[int, Meta(ge=10, le=30 * 86400)] = 3600
    update_format: Literal["delta", "weights"] = "delta"
    strategy: Strategy = field(default_factory=Strategy)
    client_config: ClientConfig = field(default_factory=ClientConfig)
    differential_privacy: DpConfig | None = None
    secure_aggregation: SecAggConfig | None = None
    auto_aggregate: bool = False
    max_sample_count: Annotated[
        int,
        Meta(
            ge=1,
            le=1_000_000_000,
            description="Cap on the sample_count an update is weighted by (in the device's offer).",
        ),
    ] = 10_000
    max_update_norm: (
        Annotated[
            float,
            Meta(gt=0, le=1e12, description="Bound on the L2 norm of each update's delta."),
        ]
        | None
    ) = None


class Round(Result, kw_only=True):
    id: str
    org_id: str
    model_id: str
    base_version: int
    federation_id: str | None
    state: RoundState
    target_device_count: int
    min_updates: int
    deadline_seconds: int
    update_format: str
    strategy: str
    strategy_params: dict[str, Any]
    client_config: dict[str, Any]
    dp_config: dict[str, Any] | None
    secagg_config: dict[str, Any] | None
    auto_aggregate: bool
    selection_seed: int | None
    selection_criteria: dict[str, Any] | None
    eligible_count: int | None
    started_at: datetime | None
    deadline_at: datetime | None
    finished_at: datetime | None
    cancel_reason: str | None
    failure_reason: str | None
    result_version: int | None
    created_at: datetime
    updated_at: datetime
    max_sample_count: int
    max_update_norm: float | None
    selection_method: str | None
    sample_rate: float | None


class OrgParticipation(Result, kw_only=True):
    """One organization's part in a round: counts only, never its device ids."""

    org_id: str
    selected: int
    updates: int


class RoundDetail(Round, kw_only=True):
    selected_devices: list[str]  # the caller's own organization's devices only
    participation: list[OrgParticipation]


class GetRoundParams(Params):
    """A round with the devices selected for it."""

    round_id: RoundId


class ListRoundsParams(Params):
    """Rounds of the caller's organization and of the federations it is an active member of."""

    model_id: ModelId | None = None
    federation_id: FederationId | None = None
    state: RoundState | None = None
    limit: Limit = 50
    offset: Offset = 0


class ListRoundsResult(Result):
    items: list[Round]
    total: int


class ProgressParams(Params):
    """Counts for polling a round: one cheap query."""

    round_id: RoundId


class Progress(Result, kw_only=True):
    round_id: str
    state: RoundState
    # Absent for a round with differential privacy: its counts are not noised.
    selected_count: int | None = None
    received_count: int | None = None
    total_samples: int | None = None
    deadline: datetime | None
    seconds_remaining: float | None


class Criteria(Params, kw_only=True):
    """Which devices are eligible; all given conditions must hold."""

    platform: Annotated[str, Meta(min_length=1, max_length=32)] | None = None
    device_group_id: GroupId | None = None
    min_battery: Percent | None = None
    charging: bool | None = None
    network_type: Annotated[str, Meta(min_length=1, max_length=32)] | None = None
    heartbeat_max_age_seconds: Annotated[int, Meta(ge=1)] | None = None
    min_app_version: AppVersion | None = None
    max_app_version: AppVersion | None = None
    fraction: Annotated[float, Meta(gt=0, le=1)] | None = None
    stratify_by_platform: bool = False


class SelectDevicesParams(MutatingParams, kw_only=True):
    """Pick devices for a pending round at random among the eligible ones.

    Without differential privacy: up to target_device_count devices uniformly without
    replacement (or per platform). With it: Poisson sampling, each eligible device
    independently with probability min(1, target_device_count / eligible, fraction).
    """

    round_id: RoundId
    criteria: Criteria = field(default_factory=Criteria)


class SelectDevicesResult(Result, kw_only=True):
    round_id: str
    state: RoundState
    selected: list[str]  # the caller's own organization's devices only
    selected_count: int | None = None  # absent for a round with differential privacy
    participation: list[OrgParticipation]
    eligible_count: int
    selection_seed: int


class StartRoundParams(MutatingParams, kw_only=True):
    """Start a pending or selected round: devices get offers, the deadline starts."""

    round_id: RoundId


class CancelRoundParams(MutatingParams, kw_only=True):
    """Cancel a round that has not finished; its updates will never be aggregated."""

    round_id: RoundId
    reason: Reason = "cancelled by the organization"


class AggregateParams(MutatingParams, kw_only=True):
    """Aggregate a running round's updates into a new model version (the round then completes).

    With publish=false the new version is a draft: the organization reads and
    downloads it (models.versions.get/list/download), but no round can start
    from it (training.create_round answers precondition_failed) and federation
    members do not see it, until models.versions.publish.
    """

    round_id: RoundId
    strategy: Strategy | None = None
    min_updates: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    publish: Annotated[
        bool,
        Meta(description="false stores the new version as a draft, see models.versions.publish"),
    ] = True
