"""One-way ANOVA on group summaries, with Tukey-Kramer pairwise comparisons.

The F test of Fisher (``scipy.stats.f_oneway``): ``SS_within = sum M2_i``
and ``SS_between = sum n_i (mean_i - mean)^2`` come straight from the
summaries (see :func:`fedrpc.fl.stats.summary.pooled`). The post-hoc test is
Tukey's HSD with the Kramer 1956 standard error for unequal sizes, as
``scipy.stats.tukey_hsd``: for groups i, j,
``se = sqrt(MS_within / 2 * (1/n_i + 1/n_j))``, the p-value is the
studentized range survival function at ``|mean_i - mean_j| / se`` with
``k`` groups and ``N - k`` degrees of freedom, and the interval is
``mean_i - mean_j +/- q_crit * se``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.stats._common import ConfidenceInterval, check_confidence_level, check_flag
from fedrpc.fl.stats._studentized_range import studentized_range_isf, studentized_range_sf
from fedrpc.fl.stats.summary import GroupSummary, pooled

__all__ = ["AnovaResult", "TukeyPair", "anova"]


@dataclass(frozen=True, slots=True)
class TukeyPair:
    """One Tukey-Kramer comparison of groups ``group_a < group_b`` (indices into the input).

    ``mean_difference`` is ``mean[group_a] - mean[group_b]``; the interval is
    for that difference; ``significant`` is ``p_value < 1 - confidence_level``.
    """

    group_a: int
    group_b: int
    mean_difference: float
    p_value: float
    confidence_interval: ConfidenceInterval
    significant: bool


@dataclass(frozen=True, slots=True)
class AnovaResult:
    """Outcome of a one-way ANOVA.

    Attributes
    ----------
    f_statistic, p_value : float
        Fisher's F and its upper-tail p-value.
    df_between, df_within : int
        ``k - 1`` and ``N - k``.
    eta_squared : float
        ``SS_between / SS_total``, the share of variance the groups explain.
    significant : bool
        ``p_value < 1 - confidence_level``.
    post_hoc : tuple of TukeyPair
        Every pair ``(0, 1), (0, 2), ..., (k-2, k-1)``; empty unless asked for.
    """

    f_statistic: float
    p_value: float
    df_between: int
    df_within: int
    eta_squared: float
    significant: bool
    post_hoc: tuple[TukeyPair, ...]


def anova(
    groups: Sequence[GroupSummary],
    confidence_level: float = 0.95,
    post_hoc: bool = True,
) -> AnovaResult:
    """Test that all ``groups`` share one mean; optionally compare every pair.

    Parameters
    ----------
    groups : sequence of GroupSummary
        At least 2 groups of at least 2 observations each.
    confidence_level : float
        In (0, 1): the level of the pairwise intervals, and
        ``1 - confidence_level`` is the significance threshold.
    post_hoc : bool
        Whether to run Tukey-Kramer on every pair (k (k - 1) / 2 of them).

    Raises
    ------
    InvalidInput
        On fewer than 2 groups, a group of fewer than 2 observations, no
        spread within any group, or a bad level.
    """
    level = check_confidence_level(confidence_level)
    post_hoc = check_flag(post_hoc, "post_hoc")
    groups = list(groups)
    if len(groups) < 2:
        raise InvalidInput("ANOVA needs at least 2 groups")
    if not all(isinstance(g, GroupSummary) for g in groups):
        raise InvalidInput("every group must be a group summary")
    small = [i for i, g in enumerate(groups) if g.n < 2]
    if small:
        raise InvalidInput(f"group {small[0]} has fewer than 2 observations; ANOVA needs 2 or more")
    n, _, ss_within, ss_between = pooled(groups)
    if ss_within == 0:
        raise InvalidInput(
            "every group has zero variance (all values within each group are the same), "
            "so the F statistic is undefined"
        )
    k = len(groups)
    df_between, df_within = k - 1, n - k
    ms_within = ss_within / df_within
    f = (ss_between / df_between) / ms_within
    p = float(stats.f.sf(f, df_between, df_within))
    pairs = _tukey_kramer(groups, ms_within, df_within, level) if post_hoc else ()
    return AnovaResult(
        f_statistic=f,
        p_value=p,
        df_between=df_between,
        df_within=df_within,
        eta_squared=ss_between / (ss_between + ss_within),
        significant=p < 1.0 - level,
        post_hoc=pairs,
    )


def _tukey_kramer(
    groups: list[GroupSummary], ms_within: float, df: int, level: float
) -> tuple[TukeyPair, ...]:
    k = len(groups)
    means = np.array([g.mean for g in groups], dtype=float)
    sizes = np.array([g.n for g in groups], dtype=float)
    a, b = np.triu_indices(k, 1)
    differences = means[a] - means[b]
    standard_errors = np.sqrt(ms_within / 2.0 * (1.0 / sizes[a] + 1.0 / sizes[b]))
    p_values = studentized_range_sf(np.abs(differences) / standard_errors, k, df)
    radii = studentized_range_isf(1.0 - level, k, df) * standard_errors
    return tuple(
        TukeyPair(
            group_a=int(i),
            group_b=int(j),
            mean_difference=float(d),
            p_value=float(p),
            confidence_interval=ConfidenceInterval(float(d - r), float(d + r), level),
            significant=bool(p < 1.0 - level),
        )
        for i, j, d, p, r in zip(a, b, differences, p_values, radii, strict=True)
    )
