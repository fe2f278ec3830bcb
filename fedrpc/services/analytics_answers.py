"""The four federated analytics questions, answered from per-group summaries.

Rules shared by all four (the floor, the scope, the record) live in
:mod:`fedrpc.services.analytics_questions`; the statistics in ``fedrpc.fl.stats``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import numpy as np

from fedrpc.db import Database
from fedrpc.errors import BadRequest, PreconditionFailed
from fedrpc.fl import stats
from fedrpc.math_pool import MathPool
from fedrpc.services import analytics_dp
from fedrpc.services.analytics_questions import (
    Policy,
    Scope,
    SummaryRow,
    check_kind,
    check_spending,
    floor_of,
    interval,
    merged_row,
    nothing_to_show,
    numeric_groups,
    own_only,
)
from schemas.federations.analytics import (
    AnovaParams,
    AnovaResult,
    ChiSquareParams,
    ChiSquareResult,
    DescriptiveParams,
    DescriptiveResult,
    GroupStats,
    HistogramCounts,
    Percentiles,
    PostHocPair,
    Table,
    TTestParams,
    TTestResult,
)


class _Percentiles(msgspec.Struct):
    group_id: str | None = None  # None: over all the shown groups
    percentiles: list[float] | None = None


class _Bin(msgspec.Struct):
    group_id: str
    bin: int
    count: int
    devices: int


class _Cell(msgspec.Struct):
    row: str
    col: str
    count: int
    own: int  # of them, the asking organization's devices


def _stats(row: SummaryRow, order_stats: bool, pct: list[float] | None) -> GroupStats:
    s = row.summary()
    out = GroupStats(group_id=row.group_id, count=s.n, mean=s.mean, std_dev=s.std_dev)
    out.missing = row.missing
    if not order_stats:
        return out
    out.min, out.max = s.min, s.max
    if pct is not None:
        out.percentiles = Percentiles(p25=pct[0], p50=pct[1], p75=pct[2])
        out.median = pct[1]
    return out


async def descriptive(
    db: Database,
    policy: Policy,
    org_id: str,
    query_id: str,
    p: DescriptiveParams,
    *,
    pool: MathPool | None = None,
) -> DescriptiveResult:
    check_kind(policy, p.variable, "numeric")
    check_spending(policy, org_id, p.dp, "descriptive")
    scope = Scope.of(p, org_id, p.variable, p.group_by, p.group_ids)
    if p.dp is not None:
        return await analytics_dp.descriptive(db, policy, query_id, p, scope, pool=pool)
    floor = floor_of(policy, p.filters)
    shown, suppressed, overlapping = await numeric_groups(db, scope, floor)
    if not shown:
        raise nothing_to_show(floor, suppressed)
    visible = scope.sql(group_ids=[r.group_id for r in shown])
    pct: dict[str | None, list[float]] = {}
    if p.include_percentiles:
        rows = await db.all("federations.analytics.list_group_percentiles", _Percentiles, **visible)
        pct = {r.group_id: r.percentiles for r in rows}
    if overlapping:  # a device in two shown groups: overall counts its observations once
        overall = await db.get("federations.analytics.find_overall_summary", SummaryRow, **visible)
        if p.include_percentiles:
            pct[None] = (
                await db.get(
                    "federations.analytics.find_overall_percentiles", _Percentiles, **visible
                )
            ).percentiles
    else:
        overall = merged_row(shown)
    overall_pct = pct.get(None)
    order = {r.group_id: policy.allow_min_max or own_only(scope, r.group_id) for r in shown}
    groups = [_stats(r, order[r.group_id], pct.get(r.group_id)) for r in shown]
    if p.histogram is not None:
        await _histograms(db, visible, p, floor, [g for g in groups if order[g.group_id]])
    return DescriptiveResult(
        query_id=query_id,
        variable=p.variable,
        group_by=p.group_by,
        groups=groups,
        suppressed_groups=suppressed,
        overall=_stats(overall, all(order.values()), overall_pct),
    )


async def _histograms(
    db: Database, visible: dict[str, Any], p: DescriptiveParams, floor: int, groups: list
) -> None:
    h = p.histogram
    if not h.lower < h.upper:
        raise BadRequest("histogram.lower must be below histogram.upper", field="histogram")
    rows = await db.all(
        "federations.analytics.list_histogram_counts",
        _Bin,
        **visible,
        lower=h.lower,
        upper=h.upper,
        bins=h.bins,
    )
    counts: dict[str, dict[int, _Bin]] = {}
    for r in rows:
        counts.setdefault(r.group_id, {})[r.bin] = r
    empty = _Bin("", 0, 0, 0)

    def shown(b: _Bin) -> int | None:
        # A bin is a group too: fewer devices than the floor is not shown.
        return b.count if b.count == 0 or b.devices >= floor else None

    edges = [float(e) for e in np.linspace(h.lower, h.upper, h.bins + 1)]
    for g in groups:
        got = counts.get(g.group_id, {})
        g.histogram = HistogramCounts(
            edges=edges,
            counts=[shown(got.get(b, empty)) for b in range(1, h.bins + 1)],
            below=shown(got.get(0, empty)),
            above=shown(got.get(h.bins + 1, empty)),
        )


async def t_test(
    db: Database,
    policy: Policy,
    org_id: str,
    query_id: str,
    p: TTestParams,
    *,
    pool: MathPool | None = None,
) -> TTestResult:
    check_kind(policy, p.variable, "numeric")
    check_spending(policy, org_id, p.dp, "t_test")
    if p.group_a == p.group_b:
        raise BadRequest("group_a and group_b must be different groups", field="group_b")
    scope = Scope.of(p, org_id, p.variable, p.group_by, [p.group_a, p.group_b])
    if p.dp is not None:
        found, _, charge = await analytics_dp.summaries(db, policy, query_id, p, scope, pool=pool)
        floor = floor_of(policy, p.filters)
    else:
        floor = floor_of(policy, p.filters)
        shown = (await numeric_groups(db, scope, floor)).shown
        found, charge = {r.group_id: r.summary() for r in shown}, None
    missing = [g for g in (p.group_a, p.group_b) if g not in found]
    if missing:
        raise PreconditionFailed(
            f"a group has fewer than {floor} devices: it cannot be compared",
            suppressed_groups=missing,
        )
    a, b = found[p.group_a], found[p.group_b]
    r = stats.t_test(a, b, confidence_level=p.confidence_level, equal_var=p.equal_var)
    return TTestResult(
        query_id=query_id,
        t_statistic=r.t_statistic,
        p_value=r.p_value,
        degrees_of_freedom=r.degrees_of_freedom,
        mean_difference=r.mean_difference,
        confidence_interval=interval(r.confidence_interval),
        significant=r.significant,
        cohens_d=r.cohens_d,
        count_a=a.n,
        count_b=b.n,
        dp=charge,
    )


async def anova(
    db: Database,
    policy: Policy,
    org_id: str,
    query_id: str,
    p: AnovaParams,
    *,
    pool: MathPool | None = None,
) -> AnovaResult:
    check_kind(policy, p.variable, "numeric")
    check_spending(policy, org_id, p.dp, "anova")
    scope = Scope.of(p, org_id, p.variable, p.group_by, p.group_ids)
    if p.dp is not None:
        found, suppressed, charge = await analytics_dp.summaries(
            db, policy, query_id, p, scope, pool=pool
        )
        floor = floor_of(policy, p.filters)
    else:
        floor = floor_of(policy, p.filters)
        shown, suppressed, _ = await numeric_groups(db, scope, floor)
        found, charge = {r.group_id: r.summary() for r in shown}, None
    if len(found) < 2:
        raise PreconditionFailed(
            f"ANOVA needs two groups of at least {floor} values",
            suppressed_groups=suppressed,
        )
    ids = sorted(found)
    # Tukey's pairs grow with the square of the groups: off the event loop.
    r = await asyncio.to_thread(
        stats.anova,
        [found[g] for g in ids],
        confidence_level=p.confidence_level,
        post_hoc=p.post_hoc,
    )
    pairs = None
    if p.post_hoc:
        pairs = [
            PostHocPair(
                group_a=ids[x.group_a],
                group_b=ids[x.group_b],
                mean_difference=x.mean_difference,
                p_value=x.p_value,
                confidence_interval=interval(x.confidence_interval),
                significant=x.significant,
            )
            for x in r.post_hoc
        ]
    return AnovaResult(
        query_id=query_id,
        f_statistic=r.f_statistic,
        p_value=r.p_value,
        degrees_of_freedom_between=r.df_between,
        degrees_of_freedom_within=r.df_within,
        eta_squared=r.eta_squared,
        significant=r.significant,
        groups=ids,
        post_hoc_pairs=pairs,
        suppressed_groups=suppressed,
        dp=charge,
    )


def shown_table(
    cells: dict[tuple[str, str], tuple[int, int]], floor: int
) -> tuple[list[str], list[str], int]:
    """Rows and columns whose other organizations' devices number none or at least the floor
    (the asker's own devices never count toward it: it could pad a category with them and
    subtract), dropping until none is dropped; and how many categories were dropped (their
    names are devices' free text: not shown)."""
    rows = sorted({r for r, _ in cells})
    cols = sorted({c for _, c in cells})
    dropped = 0

    def others(pairs) -> int:
        return sum(cells[x][0] - cells[x][1] for x in pairs if x in cells)

    def small(n: int) -> bool:
        return 0 < n < floor

    while True:
        small_rows = [r for r in rows if small(others((r, c) for c in cols))]
        small_cols = [c for c in cols if small(others((r, c) for r in rows))]
        if not small_rows and not small_cols:
            return rows, cols, dropped
        dropped += len(small_rows) + len(small_cols)
        rows = [r for r in rows if r not in small_rows]
        cols = [c for c in cols if c not in small_cols]


async def chi_square(
    db: Database, policy: Policy, org_id: str, query_id: str, p: ChiSquareParams
) -> ChiSquareResult:
    for v in (p.variable_1, p.variable_2):
        check_kind(policy, v, "categorical")
    check_spending(policy, org_id, None, "chi_square")
    if p.variable_1 == p.variable_2:
        raise BadRequest("variable_1 and variable_2 must differ", field="variable_2")
    group_by = "federation_member" if p.group_ids is None else "device_group"
    scope = Scope.of(p, org_id, p.variable_1, group_by, p.group_ids)
    params = scope.sql() | {"variable_1": p.variable_1, "variable_2": p.variable_2}
    del params["variable"]
    found = await db.all("federations.analytics.list_contingency_counts", _Cell, **params)
    cells = {(c.row, c.col): (c.count, c.own) for c in found}
    floor = floor_of(policy, p.filters)
    rows, cols, dropped = shown_table(cells, floor)
    if len(rows) < 2 or len(cols) < 2:
        raise PreconditionFailed(
            "the table needs two categories of each variable, each held by none or at least "
            f"{floor} devices of other organizations",
            suppressed_categories=dropped,
        )
    observed = [[cells.get((r, c), (0, 0))[0] for c in cols] for r in rows]
    r = stats.chi_square(np.asarray(observed, dtype=np.int64), correction=p.yates)
    significant = r.p_value < 1 - p.confidence_level
    return ChiSquareResult(
        query_id=query_id,
        chi_square_statistic=r.statistic,
        p_value=r.p_value,
        degrees_of_freedom=r.dof,
        observed=Table(rows=rows, columns=cols, counts=observed),
        expected=Table(rows=rows, columns=cols, counts=[list(x) for x in r.expected]),
        cramers_v=r.cramers_v,
        significant=significant,
        yates_applied=r.corrected,
        warnings=list(r.warnings),
        suppressed_categories=dropped,
    )
