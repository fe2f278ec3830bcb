"""Federated analytics: finishing statistics from the per-group summaries SQL computes.

Devices report observations; Postgres reduces them per group to ``n``, mean,
``M2`` (sum of squared deviations from the group mean), min, max,
percentiles and contingency counts. These kernels take only those summaries,
never raw values, and give what scipy gives on the raw values: descriptive
statistics, Welch's or Student's t-test, one-way ANOVA with Tukey-Kramer
post-hoc pairs, and the chi-square test of independence.

Conventions: variances and standard deviations use ddof=1; a result is
significant when its p-value is below ``1 - confidence_level``; bad input
raises :class:`fedrpc.fl.InvalidInput`.
"""

from fedrpc.fl.stats._common import ConfidenceInterval
from fedrpc.fl.stats.anova import AnovaResult, TukeyPair, anova
from fedrpc.fl.stats.chi_square import ChiSquareResult, chi_square
from fedrpc.fl.stats.summary import Description, GroupSummary, describe, merge
from fedrpc.fl.stats.ttest import TTestResult, t_test

__all__ = [
    "AnovaResult",
    "ChiSquareResult",
    "ConfidenceInterval",
    "Description",
    "GroupSummary",
    "TTestResult",
    "TukeyPair",
    "anova",
    "chi_square",
    "describe",
    "merge",
    "t_test",
]
