"""federations.analytics.*: statistical questions over what the members' devices report.

Org admins of the federation's owner and active members ask; every question is
recorded (federations.analytics.queries.*). The rules are in
fedrpc/services/analytics_questions.py and analytics_answers.py (docs/analytics.md).
"""

from __future__ import annotations

from functools import partial
from typing import Any

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


async def _ask(ctx: Context, p: Any, query_type: str, answer: Any) -> Any:
    """A member asks; the question is answered under the federation's policy and recorded."""
    await federation_for_member(ctx, p.federation_id)
    policy = await policy_of(ctx.db, p.federation_id)
    return await recorded(
        ctx.db, ctx.org_id, query_type, p, lambda qid: answer(ctx.db, policy, ctx.org_id, qid, p)
    )


def _priced(ctx: Context, answer: Any) -> Any:
    """``answer`` with a dp question's charge priced in the app's math pool."""
    return partial(answer, pool=ctx.services.math_pool)


@rpc_method(ORG)
async def descriptive(ctx: Context, p: DescriptiveParams) -> DescriptiveResult:
    """Per group and overall: count, mean, std_dev, missing, and order statistics (min, max,
    median, percentiles, histogram) of other organizations' devices where the federation
    allows them; groups below the privacy floor are suppressed."""
    return await _ask(ctx, p, "descriptive", _priced(ctx, answers.descriptive))


@rpc_method(ORG)
async def t_test(ctx: Context, p: TTestParams) -> TTestResult:
    """Welch's (or Student's) t-test of mean(group_a) - mean(group_b) with its confidence
    interval and Cohen's d; a group below the privacy floor is `precondition_failed`."""
    return await _ask(ctx, p, "t_test", _priced(ctx, answers.t_test))


@rpc_method(ORG)
async def anova(ctx: Context, p: AnovaParams) -> AnovaResult:
    """One-way ANOVA across the shown groups with eta squared and Tukey-Kramer HSD pairs."""
    return await _ask(ctx, p, "anova", _priced(ctx, answers.anova))


@rpc_method(ORG)
async def chi_square(ctx: Context, p: ChiSquareParams) -> ChiSquareResult:
    """Chi-square test of independence of two categorical variables over the members'
    devices (each counted once, by its latest category of each), with Cramer's V."""
    return await _ask(ctx, p, "chi_square", answers.chi_square)
