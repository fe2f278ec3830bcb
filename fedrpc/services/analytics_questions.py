"""Federated analytics questions: SQL reduces observations to per-group summaries, the
kernels in ``fedrpc.fl.stats`` finish them, the privacy floor decides what is shown.

A group is shown only when it holds at least ``floor`` values: the
federation's ``analytics_min_group_size``, raised by ``filters.min_sample_count``.
Smaller groups are named in ``suppressed_groups`` and enter nothing else (not
even ``overall``), so no answer is computed from fewer values than the floor.
Min and max are shown only where the federation allows them. A question with
``dp`` goes through :mod:`fedrpc.services.analytics_dp` instead: noised
summaries of clipped, per-device values, charged to the privacy ledger.
Every question is recorded (``analytics_queries``), failed ones too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from fedrpc.auth import new_id
from fedrpc.db import Database, jsonb
from fedrpc.errors import AppError, BadRequest, PreconditionFailed
from fedrpc.fl import InvalidInput, stats
from schemas.federations.analytics import ConfidenceInterval, Filters

R = TypeVar("R")


class Policy(msgspec.Struct):
    min_group_size: int
    allow_min_max: bool
    variables: dict[str, str] | None
    total_delta_budget: float | None


class SummaryRow(msgspec.Struct):
    """One group as SQL reduces it: mean and M2 about a provisional centre (docs/analytics.md)."""

    group_id: str
    n: int
    missing: int
    centre: float
    shift: float
    m2_about_centre: float
    min: float | None
    max: float | None

    def summary(self) -> stats.GroupSummary:
        # Centre c, shift = sum(x - c): mean = c + shift / n, M2 = sum((x - c)^2) - shift^2 / n.
        mean = self.centre + self.shift / self.n
        m2 = max(self.m2_about_centre - self.shift**2 / self.n, 0.0) if self.n > 1 else 0.0
        return stats.GroupSummary(self.n, mean, m2, self.min, self.max)


class Scope(msgspec.Struct, kw_only=True):
    """Which observations a question reads (the arguments of SQL's analytics_scope)."""

    federation_id: str
    org_id: str  # the asking organization: device groups are its own only
    variable: str
    group_by: str
    group_ids: list[str] | None
    start_time: Any = None
    end_time: Any = None
    device_platform: str | None = None

    @classmethod
    def of(
        cls, p: Any, org_id: str, variable: str, group_by: str, group_ids: list[str] | None
    ) -> Scope:
        f = p.filters or Filters()
        return cls(
            federation_id=p.federation_id,
            org_id=org_id,
            variable=variable,
            group_by=group_by,
            group_ids=group_ids,
            start_time=f.start_time,
            end_time=f.end_time,
            device_platform=f.device_platform,
        )

    def sql(self, **changes: Any) -> dict[str, Any]:
        return msgspec.structs.asdict(msgspec.structs.replace(self, **changes))


async def policy_of(db: Database, federation_id: str) -> Policy:
    return await db.get(
        "federations.analytics.find_analytics_policy", Policy, federation_id=federation_id
    )


def floor_of(policy: Policy, filters: Filters | None) -> int:
    """The fewest values a shown group holds."""
    asked = filters.min_sample_count if filters and filters.min_sample_count else 0
    return max(policy.min_group_size, asked)


def check_kind(policy: Policy, variable: str, kind: str) -> None:
    declared = (policy.variables or {}).get(variable)
    if policy.variables is not None and declared is None:
        raise BadRequest(f"the federation does not declare variable {variable!r}", field="variable")
    if declared is not None and declared != kind:
        raise BadRequest(f"variable {variable!r} is {declared}, not {kind}", field="variable")


async def numeric_groups(
    db: Database, scope: Scope, floor: int
) -> tuple[list[SummaryRow], list[str]]:
    """The groups with at least ``floor`` values, and the ids of the others."""
    rows = await db.all("federations.analytics.list_numeric_summaries", SummaryRow, **scope.sql())
    shown = [r for r in rows if r.n >= floor]
    return shown, [r.group_id for r in rows if r.n < floor]


def nothing_to_show(floor: int, suppressed: list[str]) -> PreconditionFailed:
    if not suppressed:
        return PreconditionFailed("no observations match the question", suppressed_groups=[])
    return PreconditionFailed(
        f"every group has fewer than {floor} values (the federation's privacy floor or "
        "min_sample_count): nothing can be shown",
        suppressed_groups=suppressed,
    )


def interval(ci: stats.ConfidenceInterval) -> ConfidenceInterval:
    return ConfidenceInterval(lower=ci.lower, upper=ci.upper, level=ci.level)


async def recorded(
    db: Database,
    org_id: str,
    query_type: str,
    p: msgspec.Struct,
    answer: Callable[[str], Awaitable[R]],
) -> R:
    """Run ``answer(query_id)`` and record the question with its result or its failure."""
    query_id = new_id("anq")
    params = {k: v for k, v in msgspec.to_builtins(p).items() if k != "idempotency_key"}
    record = {
        "id": query_id,
        "federation_id": p.federation_id,
        "org_id": org_id,
        "query_type": query_type,
        "params": jsonb(params),
    }
    try:
        result = await answer(query_id)
    except (AppError, InvalidInput) as exc:
        reason = exc.message if isinstance(exc, AppError) else str(exc)
        await db.run(
            "federations.analytics.insert_query",
            **record,
            status="failed",
            result=None,
            error_message=reason,
        )
        if isinstance(exc, InvalidInput):
            raise BadRequest(reason) from None
        raise
    await db.run(
        "federations.analytics.insert_query",
        **record,
        status="completed",
        result=jsonb(msgspec.to_builtins(result)),
        error_message=None,
    )
    return result
