"""Two-sample t-test on group summaries: Welch's (default) or Student's.

The same numbers as ``scipy.stats.ttest_ind(a, b, equal_var=...)`` and its
``confidence_interval(level)`` on the raw values, computed from ``n``, mean
and ``M2`` alone. Welch 1947, "The generalization of 'Student's' problem when
several different population variances are involved": standard error
``sqrt(v_a/n_a + v_b/n_b)`` and the Welch-Satterthwaite degrees of freedom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.stats._common import ConfidenceInterval, check_confidence_level, check_flag
from fedrpc.fl.stats.summary import GroupSummary

__all__ = ["TTestResult", "t_test"]


@dataclass(frozen=True, slots=True)
class TTestResult:
    """Outcome of a two-sided two-sample t-test of ``mean(a) - mean(b)``.

    Attributes
    ----------
    t_statistic : float
        ``mean_difference / standard_error``.
    p_value : float
        Two-sided p-value.
    degrees_of_freedom : float
        Welch-Satterthwaite df (fractional) or ``n_a + n_b - 2``.
    mean_difference : float
        ``mean(a) - mean(b)``.
    confidence_interval : ConfidenceInterval
        Interval for ``mean(a) - mean(b)`` at the requested level.
    cohens_d : float
        ``mean_difference`` over the pooled standard deviation
        ``sqrt((M2_a + M2_b) / (n_a + n_b - 2))`` (Cohen 1988), for Welch's
        test as well, so the effect size does not depend on the test chosen.
    significant : bool
        ``p_value < 1 - confidence_level``.
    """

    t_statistic: float
    p_value: float
    degrees_of_freedom: float
    mean_difference: float
    confidence_interval: ConfidenceInterval
    cohens_d: float
    significant: bool


def t_test(
    a: GroupSummary,
    b: GroupSummary,
    confidence_level: float = 0.95,
    equal_var: bool = False,
) -> TTestResult:
    """Two-sided test that groups ``a`` and ``b`` have the same mean.

    Parameters
    ----------
    a, b : GroupSummary
        The two groups; each needs at least 2 observations.
    confidence_level : float
        In (0, 1): the level of the interval, and ``1 - confidence_level`` is
        the significance threshold.
    equal_var : bool
        False (default): Welch's test. True: Student's test with the pooled
        variance.

    Raises
    ------
    InvalidInput
        On a group of fewer than 2 observations, both groups without any
        spread, or a bad level.
    """
    level = check_confidence_level(confidence_level)
    equal_var = check_flag(equal_var, "equal_var")
    for name, group in (("a", a), ("b", b)):
        if not isinstance(group, GroupSummary):
            raise InvalidInput(f"group {name} must be a group summary")
        if group.n < 2:
            raise InvalidInput(f"group {name} needs at least 2 observations for a t-test")
    if a.m2 == 0 and b.m2 == 0:
        raise InvalidInput(
            "both groups have zero variance (every value in each group is the same), "
            "so the t statistic is undefined"
        )
    n_a, n_b = a.n, b.n
    pooled_variance = (a.m2 + b.m2) / (n_a + n_b - 2)
    if equal_var:
        df = float(n_a + n_b - 2)
        standard_error = math.sqrt(pooled_variance * (1.0 / n_a + 1.0 / n_b))
    else:
        share_a, share_b = a.m2 / (n_a - 1) / n_a, b.m2 / (n_b - 1) / n_b
        standard_error = math.sqrt(share_a + share_b)
        df = (share_a + share_b) ** 2 / (share_a**2 / (n_a - 1) + share_b**2 / (n_b - 1))
    difference = a.mean - b.mean
    t = difference / standard_error
    p = float(2.0 * stats.t.sf(abs(t), df))
    radius = float(stats.t.isf((1.0 - level) / 2.0, df)) * standard_error
    return TTestResult(
        t_statistic=t,
        p_value=p,
        degrees_of_freedom=df,
        mean_difference=difference,
        confidence_interval=ConfidenceInterval(difference - radius, difference + radius, level),
        cohens_d=difference / math.sqrt(pooled_variance),
        significant=p < 1.0 - level,
    )
