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
from typing import Any, NamedTuple, TypeVar

import msgspec

from fedrpc.auth import new_id
from fedrpc.db import Database, jsonb
from fedrpc.errors import AppError, BadRequest, Forbidden, PreconditionFailed
from fedrpc.fl import InvalidInput, stats
from schemas.federations.analytics import ConfidenceInterval, Filters

R = TypeVar("R")


class Policy(msgspec.Struct):
    min_group_size: int
    allow_min_max: bool
    variables: dict[str, str] | None
    total_epsilon_budget: float | None
    total_delta_budget: float | None
    owner_org_id: str


class SummaryRow(msgspec.Struct):
    """One group as SQL reduces it: mean and M2 about a provisional centre (docs/analytics.md)."""

    group_id: str
    devices: int
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


#: The most groups one question may have, named or found.
MAX_GROUPS = 200


def floor_of(policy: Policy, filters: Filters | None) -> int:
    """The fewest devices a shown group holds (not observations: one device reporting ten
    times is one device)."""
    asked = filters.min_sample_count if filters and filters.min_sample_count else 0
    return max(policy.min_group_size, asked)


def check_kind(policy: Policy, variable: str, kind: str) -> None:
    declared = (policy.variables or {}).get(variable)
    if policy.variables is not None and declared is None:
        raise BadRequest(f"the federation does not declare variable {variable!r}", field="variable")
    if declared is not None and declared != kind:
        raise BadRequest(f"variable {variable!r} is {declared}, not {kind}", field="variable")


def check_spending(policy: Policy, org_id: str, dp: object | None, query_type: str) -> None:
    """A federation with a privacy budget answers only with dp (as its rounds need
    differential_privacy), and only its owner spends the budget (as only the owner runs
    rounds): a member cannot drain it, nor learn a device by differencing exact answers."""
    if policy.total_epsilon_budget is None:
        return
    if dp is None:
        what = "has no dp version" if query_type == "chi_square" else "needs dp"
        raise BadRequest(
            f"this federation has a privacy budget: {query_type} {what} here", field="dp"
        )
    if org_id != policy.owner_org_id:
        raise Forbidden("only the federation's owner spends its privacy budget")


async def domain_of(db: Database, scope: Scope, found: list[str]) -> list[str]:
    """Every group the question is about: those named, every member by federation_member,
    else the asking organization's groups found. A group not shown is suppressed alike
    whether it is empty or small (which one it is would tell)."""
    if scope.group_ids is not None:
        return list(dict.fromkeys(scope.group_ids))
    if scope.group_by == "federation_member":
        rows = await db.all(
            "federations.analytics.list_member_orgs", dict, federation_id=scope.federation_id
        )
        return [r["org_id"] for r in rows]
    return found


class _DevicePart(msgspec.Struct):
    group_id: str
    device_id: str
    n: int
    missing: int
    centre: float
    shift: float
    m2_about_centre: float
    min: float | None
    max: float | None


class Grouped(NamedTuple):
    shown: list[SummaryRow]
    suppressed: list[str]
    overlapping: bool  # some device is in two shown groups


def _group_row(parts: list[_DevicePart]) -> SummaryRow:
    # Sums about one centre add up; devices are the parts with a value.
    values = [x for x in parts if x.n]
    return SummaryRow(
        group_id=parts[0].group_id,
        devices=len(values),
        n=sum(x.n for x in parts),
        missing=sum(x.missing for x in parts),
        centre=parts[0].centre,
        shift=sum(x.shift for x in parts),
        m2_about_centre=sum(x.m2_about_centre for x in parts),
        min=min((x.min for x in values), default=None),
        max=max((x.max for x in values), default=None),
    )


def merged_row(rows: list[SummaryRow], group_id: str = "overall") -> SummaryRow:
    """Groups without a device in common, as one (Chan's exact merge)."""
    merged = stats.merge([r.summary() for r in rows])
    return SummaryRow(
        group_id=group_id,
        devices=sum(r.devices for r in rows),
        n=merged.n,
        missing=sum(r.missing for r in rows),
        centre=merged.mean,
        shift=0.0,
        m2_about_centre=merged.m2,
        min=merged.min,
        max=merged.max,
    )


async def numeric_groups(db: Database, scope: Scope, floor: int) -> Grouped:
    """The groups with at least ``floor`` devices, the ids of the others asked about, and
    whether a device is in two shown groups. One row per (group, device) comes back:
    its count of devices needs no ``count(DISTINCT)`` sort."""
    parts = await db.all(
        "federations.analytics.list_group_device_summaries", _DevicePart, **scope.sql()
    )
    by_group: dict[str, list[_DevicePart]] = {}
    for x in parts:
        by_group.setdefault(x.group_id, []).append(x)
    rows = [_group_row(by_group[g]) for g in sorted(by_group)]
    domain = await domain_of(db, scope, [r.group_id for r in rows])
    if len(domain) > MAX_GROUPS:
        raise BadRequest(
            f"the question has {len(domain)} groups; at most {MAX_GROUPS}: name group_ids",
            field="group_ids",
        )
    shown = [r for r in rows if r.devices >= floor]
    ids = {r.group_id for r in shown}
    in_shown = [x.device_id for x in parts if x.group_id in ids and x.n]
    return Grouped(shown, [g for g in domain if g not in ids], len(in_shown) != len(set(in_shown)))


def nothing_to_show(floor: int, suppressed: list[str]) -> PreconditionFailed:
    return PreconditionFailed(
        f"no group has at least {floor} devices (the federation's privacy floor or "
        "min_sample_count): nothing can be shown",
        suppressed_groups=suppressed,
    )


def own_only(scope: Scope, group_id: str) -> bool:
    """Whether a group holds the asking organization's devices only: its own device groups,
    or its own row by federation_member. Other organizations' values are shown as order
    statistics (min, max, percentiles, histograms) only where the federation allows it."""
    return scope.group_by == "device_group" or group_id == scope.org_id


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
        # Device groups are the asker's own: a question naming or grouping by them stays its.
        "shared": params.get("group_by") != "device_group" and not params.get("group_ids"),
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
