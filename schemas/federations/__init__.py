from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta

from schemas._base import MutatingParams, Params, Result
from schemas._types import Delta, Description, Epsilon, FederationId, Limit, Name, Offset, OrgId
from schemas.analytics import VariableName


class PrivacyPolicy(Params, kw_only=True):
    """A differential-privacy budget for the whole federation."""

    total_epsilon_budget: Epsilon
    total_delta_budget: Delta = 1e-5


class AnalyticsPolicy(Params, kw_only=True):
    """What federated analytics may show (docs/analytics.md)."""

    min_group_size: Annotated[
        int,
        Meta(ge=2, le=1_000_000, description="Groups with fewer values are suppressed."),
    ] = 10
    allow_min_max: Annotated[
        bool, Meta(description="Whether answers show a group's min and max (single values).")
    ] = False
    variables: Annotated[
        dict[VariableName, Literal["numeric", "categorical"]] | None,
        Meta(description="Declared variables; devices may report only these. Null: any."),
    ] = None


class CreateParams(MutatingParams, kw_only=True):
    """Create a federation owned by the caller's organization, which becomes its first active member."""

    name: Name
    org_id: OrgId
    description: Description = ""
    privacy_policy: PrivacyPolicy | None = None
    analytics_policy: AnalyticsPolicy | None = None
    min_round_updates: Annotated[
        int,
        Meta(
            ge=2,
            le=100_000,
            description="Fewest updates a round's result in this federation may mix.",
        ),
    ] = 10


class Federation(Result, kw_only=True):
    id: str
    name: str
    description: str
    owner_org_id: str
    total_epsilon_budget: float | None = None
    total_delta_budget: float | None = None
    min_round_updates: int
    analytics_policy: AnalyticsPolicy | None = None
    created_at: datetime
    updated_at: datetime


class ListParams(Params, kw_only=True):
    """The federations the caller's organization owns or is an active member of."""

    org_id: OrgId | None = None
    name: Name | None = None
    limit: Limit = 50
    offset: Offset = 0


class ListResult(Result, kw_only=True):
    items: list[Federation]
    total: int


class GetParams(Params, kw_only=True):
    """One federation (owner and members only)."""

    federation_id: FederationId


class InviteParams(MutatingParams, kw_only=True):
    """Invite organizations (owner only); inviting an org twice returns its existing row."""

    federation_id: FederationId
    org_ids: Annotated[list[OrgId], Meta(min_length=1, max_length=100)]


class Membership(Result, kw_only=True):
    id: str
    federation_id: str
    org_id: str
    status: Literal["invited", "active"]
    created_at: datetime
    updated_at: datetime
    joined_at: datetime | None = None


class InviteResult(Result, kw_only=True):
    invitations: list[Membership]


class JoinParams(MutatingParams, kw_only=True):
    """Accept an invitation for the caller's own organization; joining twice is a no-op."""

    federation_id: FederationId
    org_id: OrgId


class MembersParams(Params, kw_only=True):
    """Every member with its contribution statistics, from completed rounds without DP only."""

    federation_id: FederationId


class Member(Result, kw_only=True):
    # No defaults: null statistics are shown as null, not omitted.
    org_id: str
    status: str
    joined_at: datetime | None
    rounds_contributed: int
    # Null until the organization's updates are mixed enough to show (docs/privacy.md).
    total_samples: int | None
    avg_accuracy: float | None
    avg_loss: float | None
    last_contribution_at: datetime | None


class MembersResult(Result, kw_only=True):
    federation_id: str
    members: list[Member]
