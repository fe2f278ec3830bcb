"""federations.analytics.*: statistical questions over what the members' devices report.

Org admins of the federation's owner and active members ask; every question is
recorded (federations.analytics.queries.*). The rules are in
fedrpc/services/analytics_questions.py and analytics_answers.py (docs/analytics.md).
"""

from __future__ import annotations

from fedrpc.context import Context
from fedrpc.registry import ORG, rpc_method
from fedrpc.services import analytics_answers as answers
from fedrpc.services.analytics_questions import policy_of, recorded
from fedrpc.services.policy import federation_for_member
from schemas.federations.analytics import (
    AnovaParams,
    AnovaResult,
    ChiSquareParams,
    ChiSquareResult,
    DescriptiveParams,
    DescriptiveResult,
    TTestParams,
    TTestResult,
)


@rpc_method(ORG)
async def descriptive(ctx: Context, p: DescriptiveParams) -> DescriptiveResult:
    """Per group and overall: count, mean, median, std_dev, percentiles, missing (min and max
    where the federation allows them), an optional histogram; small groups are suppressed."""
    await federation_for_member(ctx, p.federation_id)
    policy = await policy_of(ctx.db, p.federation_id)
    return await recorded(
        ctx.db,
        ctx.org_id,
        "descriptive",
        p,
        lambda qid: answers.descriptive(ctx.db, policy, ctx.org_id, qid, p),
    )


@rpc_method(ORG)
async def t_test(ctx: Context, p: TTestParams) -> TTestResult:
    """Welch's (or Student's) t-test of mean(group_a) - mean(group_b) with its confidence
    interval and Cohen's d; a group below the privacy floor is `precondition_failed`."""
    await federation_for_member(ctx, p.federation_id)
    policy = await policy_of(ctx.db, p.federation_id)
    return await recorded(
        ctx.db,
        ctx.org_id,
        "t_test",
        p,
        lambda qid: answers.t_test(ctx.db, policy, ctx.org_id, qid, p),
    )


@rpc_method(ORG)
async def anova(ctx: Context, p: AnovaParams) -> AnovaResult:
    """One-way ANOVA across the shown groups with eta squared and Tukey-Kramer HSD pairs."""
    await federation_for_member(ctx, p.federation_id)
    policy = await policy_of(ctx.db, p.federation_id)
    return await recorded(
        ctx.db,
        ctx.org_id,
        "anova",
        p,
        lambda qid: answers.anova(ctx.db, policy, ctx.org_id, qid, p),
    )


@rpc_method(ORG)
async def chi_square(ctx: Context, p: ChiSquareParams) -> ChiSquareResult:
    """Chi-square test of independence of two categorical variables over the members'
    devices (each counted once, by its latest category of each), with Cramer's V."""
    await federation_for_member(ctx, p.federation_id)
    policy = await policy_of(ctx.db, p.federation_id)
    return await recorded(
        ctx.db,
        ctx.org_id,
        "chi_square",
        p,
        lambda qid: answers.chi_square(ctx.db, policy, ctx.org_id, qid, p),
    )
