from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta

from schemas._base import MutatingParams, Params, Result
from schemas._types import (
    Delta,
    Epsilon,
    FederationId,
    Limit,
    NoiseMultiplier,
    Offset,
    SampleRate,
    Steps,
)

Accountant = Literal["rdp", "pld"]


class GetParams(Params, kw_only=True):
    """The federation's privacy budget and what has been spent (budget null when none is set)."""

    federation_id: FederationId


class Budget(Result, kw_only=True):
    total_epsilon_budget: float
    total_delta_budget: float


class PrivacyState(Result, kw_only=True):
    federation_id: str
    budget: Budget | None
    total_epsilon_budget: float | None
    total_delta_budget: float | None
    delta: float
    current_epsilon_spent: float
    epsilon_remaining: float | None
    is_exhausted: bool
    rounds_tracked: int


class SetBudgetParams(MutatingParams, kw_only=True):
    """Set the federation's budget (owner only); lowering it below the spent epsilon exhausts it."""

    federation_id: FederationId
    total_epsilon_budget: Epsilon
    total_delta_budget: (
        Annotated[
            Delta,
            Meta(
                description="privacy failure probability delta; omitted, the federation's "
                "current delta is kept (1e-5 if it had no budget)"
            ),
        ]
        | None
    ) = None


class EstimateParams(Params, kw_only=True):
    """What one more round with these parameters would cost; records nothing."""

    federation_id: FederationId
    noise_multiplier: NoiseMultiplier
    sample_rate: SampleRate
    num_steps: Steps = 1
    target_delta: Delta | None = None
    accountant: Accountant = "rdp"


class Estimate(Result, kw_only=True):
    federation_id: str
    accountant: str
    target_delta: float
    current_epsilon: float
    projected_epsilon: float
    round_epsilon_cost: float
    would_exceed_budget: bool
    budget_epsilon: float | None


class HistoryParams(Params, kw_only=True):
    """One row per charged round, oldest first."""

    federation_id: FederationId
    limit: Limit = 50
    offset: Offset = 0


class LedgerEntry(Result, kw_only=True):
    round_id: str
    noise_multiplier: float
    sample_rate: float
    num_steps: int
    round_epsilon_cost: float
    cumulative_epsilon: float
    delta: float
    recorded_at: datetime


class HistoryResult(Result, kw_only=True):
    federation_id: str
    items: list[LedgerEntry]
    total: int
