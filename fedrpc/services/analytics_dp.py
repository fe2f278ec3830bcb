"""Analytics questions with ``dp``: noised per-device sums, charged to the privacy ledger.

The groups are fixed by the question, never by the data (which groups exist
would itself depend on single devices): the ``group_ids`` asked for, or every
active member with ``group_by: federation_member``. Each gets a noised count,
and only groups whose *noised* count reaches the floor are shown. The charge
(one Gaussian step at ``q = 1``, ``fedrpc.fl.stats.dp``) is recorded before
anything is computed and is refused when it would exceed the budget; it is
priced in the app's math pool when given one (``pool``: the ledger's history
may hold (noise, rate) pairs this process has not priced yet).
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec
import numpy as np

from fedrpc.db import Database
from fedrpc.errors import BadRequest, PreconditionFailed
from fedrpc.fl import stats
from fedrpc.fl.privacy import RoundCharge
from fedrpc.fl.stats import dp as stats_dp
from fedrpc.math_pool import MathPool
from fedrpc.services import privacy_budget
from fedrpc.services.analytics_questions import domain_of, floor_of
from schemas.federations.analytics import DescriptiveResult, DpCharge, GroupStats


class _Sums(msgspec.Struct):
    group_id: str
    n: int
    sum: float
    sum_squares: float


async def _domain(db: Database, scope: Any) -> list[str]:
    # Fixed by the question (domain_of), never found in the data: named groups, or members.
    if scope.group_ids is None and scope.group_by != "federation_member":
        raise BadRequest(
            "with dp, name the device groups (group_ids): which groups exist must not depend "
            "on the data",
            field="group_ids",
        )
    return await domain_of(db, scope, [])


async def summaries(
    db: Database, policy: Any, query_id: str, p: Any, scope: Any, *, pool: MathPool | None = None
) -> tuple[dict[str, stats.GroupSummary], list[str], DpCharge]:
    """Each group of the question's domain whose noised count reaches the floor, the others
    (suppressed), and the charge."""
    dp = p.dp
    if not dp.lower < dp.upper:
        raise BadRequest("dp.lower must be below dp.upper", field="dp")
    domain = await _domain(db, scope)
    delta = policy.total_delta_budget or privacy_budget.DEFAULT_DELTA
    z = stats_dp.noise_multiplier_for(dp.epsilon, delta)
    mid = (dp.lower + dp.upper) / 2
    rows = await db.all(
        "federations.analytics.list_device_clipped_sums",
        _Sums,
        **scope.sql(group_ids=domain),
        lower=dp.lower,
        upper=dp.upper,
        mid=mid,
    )
    charge = RoundCharge(z, 1.0, 1)
    entry = await privacy_budget.charge_round(db, p.federation_id, query_id, charge, pool=pool)
    exact = {r.group_id: stats_dp.DeviceSums(r.n, r.sum, r.sum_squares) for r in rows}
    # The noise must be unpredictable: seeded from the OS's cryptographic source.
    rng = np.random.default_rng(secrets.randbits(128))
    shown = {}
    for g in domain:
        noised = stats_dp.noised_summary(
            exact.get(g, stats_dp.DeviceSums(0, 0.0, 0.0)), dp.lower, dp.upper, z, rng
        )
        if noised is not None and noised.n >= floor_of(policy, p.filters):
            shown[g] = noised
    spent = DpCharge(epsilon=entry.round_epsilon_cost, delta=entry.delta, noise_multiplier=z)
    return shown, [g for g in domain if g not in shown], spent


async def descriptive(
    db: Database, policy: Any, query_id: str, p: Any, scope: Any, *, pool: MathPool | None = None
) -> DescriptiveResult:
    """Noised count, mean and standard deviation per group (no percentiles, min, max or
    histogram: they would need a privacy mechanism of their own)."""
    if p.histogram is not None:
        raise BadRequest("a histogram is not available with dp", field="histogram")
    shown, suppressed, charge = await summaries(db, policy, query_id, p, scope, pool=pool)
    if not shown:
        raise PreconditionFailed(
            f"no group's noised count reaches {floor_of(policy, p.filters)}: nothing can be shown "
            "(the charge stands)",
            suppressed_groups=suppressed,
        )

    def row(group_id: str, s: stats.GroupSummary) -> GroupStats:
        return GroupStats(group_id=group_id, count=s.n, mean=s.mean, std_dev=s.std_dev)

    return DescriptiveResult(
        query_id=query_id,
        variable=p.variable,
        group_by=p.group_by,
        groups=[row(g, s) for g, s in shown.items()],
        suppressed_groups=suppressed,
        overall=row("overall", stats.merge(list(shown.values()))),
        dp=charge,
    )
