"""One-way ANOVA and Tukey-Kramer from summaries against scipy on the raw values.

References: ``scipy.stats.f_oneway`` and ``scipy.stats.tukey_hsd`` (its
``statistic``, ``pvalue`` and ``confidence_interval(level)``). scipy's Tukey
p-value is ``1 - cdf`` with the cdf integrated to 1e-11 absolute, so those
p-values are compared to 1e-9 relative or 1e-11 absolute, whichever is
looser; every other field to 1e-9 relative. scipy's ``tukey_hsd`` takes
about 14 s for 50 groups (one double integral per cell of the 50 x 50
matrix), so the 50-group case checks a sample of pairs against
``scipy.stats.studentized_range`` directly.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from scipy import stats

from fedrpc.fl import InvalidInput
from fedrpc.fl.stats import GroupSummary, anova

RTOL = 1e-9
SCIPY_TUKEY_ATOL = 1e-11


def summarize(x: np.ndarray) -> GroupSummary:
    """What Postgres reports for one group."""
    mean = float(np.mean(x))
    return GroupSummary(
        n=x.size, mean=mean, m2=float(np.sum((x - mean) ** 2)), min=x.min(), max=x.max()
    )


def make_groups(seed: int, sizes: tuple[int, ...], shift: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(20.0 + shift * i, 2.0 + (i % 3), size) for i, size in enumerate(sizes)]


CASES = {
    "three_unequal": (1, (12, 30, 7), 0.8),
    "six_unequal": (2, (25, 40, 9, 60, 14, 33), 1.1),
    "three_equal": (3, (20, 20, 20), 0.3),
}


@functools.cache
def scipy_reference(case: str) -> tuple:
    groups = make_groups(*CASES[case])
    return groups, stats.f_oneway(*groups), stats.tukey_hsd(*groups)


def eta_squared(groups: list[np.ndarray]) -> float:
    raw = np.concatenate(groups)
    ss_within = sum(np.sum((g - g.mean()) ** 2) for g in groups)
    return 1.0 - ss_within / np.sum((raw - raw.mean()) ** 2)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("level", [0.95, 0.99])
def test_anova_and_tukey_match_scipy_on_raw_values(case: str, level: float) -> None:
    groups, ref_f, ref_tukey = scipy_reference(case)
    ref_ci = ref_tukey.confidence_interval(level)

    r = anova([summarize(g) for g in groups], confidence_level=level)

    np.testing.assert_allclose(r.f_statistic, ref_f.statistic, rtol=RTOL, atol=0)
    np.testing.assert_allclose(r.p_value, ref_f.pvalue, rtol=RTOL, atol=0)
    assert (r.df_between, r.df_within) == (len(groups) - 1, sum(map(len, groups)) - len(groups))
    np.testing.assert_allclose(r.eta_squared, eta_squared(groups), rtol=RTOL, atol=0)
    assert r.significant == (ref_f.pvalue < 1 - level)
    k = len(groups)
    every_pair = [(i, j) for i in range(k) for j in range(i + 1, k)]
    assert [(p.group_a, p.group_b) for p in r.post_hoc] == every_pair
    for p in r.post_hoc:
        i, j = p.group_a, p.group_b
        half_width = (ref_ci.high[i, j] - ref_ci.low[i, j]) / 2
        np.testing.assert_allclose(p.mean_difference, ref_tukey.statistic[i, j], rtol=RTOL)
        np.testing.assert_allclose(
            p.p_value, ref_tukey.pvalue[i, j], rtol=RTOL, atol=SCIPY_TUKEY_ATOL
        )
        np.testing.assert_allclose(
            p.confidence_interval.lower, ref_ci.low[i, j], rtol=RTOL, atol=RTOL * half_width
        )
        np.testing.assert_allclose(
            p.confidence_interval.upper, ref_ci.high[i, j], rtol=RTOL, atol=RTOL * half_width
        )
        assert p.confidence_interval.level == level
        assert p.significant == (ref_tukey.pvalue[i, j] < 1 - level)


def test_fifty_groups_match_f_oneway_and_the_studentized_range() -> None:
    rng = np.random.default_rng(50)
    groups = [rng.normal(10.0 + 0.08 * i, 2.0, rng.integers(5, 60)) for i in range(50)]
    ref_f = stats.f_oneway(*groups)
    sizes = np.array([g.size for g in groups])
    df = int(sizes.sum()) - 50
    ms_within = sum(np.sum((g - g.mean()) ** 2) for g in groups) / df
    q_crit = stats.studentized_range.ppf(0.95, 50, df)

    r = anova([summarize(g) for g in groups])

    np.testing.assert_allclose(r.f_statistic, ref_f.statistic, rtol=RTOL, atol=0)
    np.testing.assert_allclose(r.p_value, ref_f.pvalue, rtol=RTOL, atol=0)
    np.testing.assert_allclose(r.eta_squared, eta_squared(groups), rtol=RTOL, atol=0)
    assert len(r.post_hoc) == 50 * 49 // 2
    # The most distant pairs, the closest and a random sample (scipy: ~6 ms per p-value).
    by_distance = sorted(r.post_hoc, key=lambda p: abs(p.mean_difference))
    sampled = rng.choice(len(r.post_hoc), 15, replace=False)
    picked = by_distance[:5] + by_distance[-5:] + [r.post_hoc[i] for i in sampled]
    for p in picked:
        a, b = groups[p.group_a], groups[p.group_b]
        difference = a.mean() - b.mean()
        standard_error = math.sqrt(ms_within / 2 * (1 / a.size + 1 / b.size))
        ref_p = stats.studentized_range.sf(abs(difference) / standard_error, 50, df)
        radius = q_crit * standard_error
        np.testing.assert_allclose(p.mean_difference, difference, rtol=RTOL, atol=RTOL * radius)
        np.testing.assert_allclose(p.p_value, ref_p, rtol=RTOL, atol=SCIPY_TUKEY_ATOL)
        np.testing.assert_allclose(
            p.confidence_interval.lower, difference - radius, rtol=RTOL, atol=RTOL * radius
        )
        np.testing.assert_allclose(
            p.confidence_interval.upper, difference + radius, rtol=RTOL, atol=RTOL * radius
        )


def test_significant_pairs_are_those_whose_interval_excludes_zero() -> None:
    groups = make_groups(9, (15, 22, 18, 30, 11, 26, 19, 24), 0.9)

    r = anova([summarize(g) for g in groups], confidence_level=0.9)

    assert any(p.significant for p in r.post_hoc) and not all(p.significant for p in r.post_hoc)
    for p in r.post_hoc:
        excludes_zero = p.confidence_interval.lower > 0 or p.confidence_interval.upper < 0
        assert p.significant == excludes_zero


def test_post_hoc_can_be_skipped() -> None:
    groups = [summarize(g) for g in make_groups(*CASES["three_unequal"])]

    with_pairs, without = anova(groups), anova(groups, post_hoc=False)

    assert without.post_hoc == ()
    assert without.f_statistic == with_pairs.f_statistic


GOOD = GroupSummary(n=3, mean=2.0, m2=2.0, min=1.0, max=3.0)
CONSTANT = GroupSummary(n=3, mean=2.0, m2=0.0, min=2.0, max=2.0)


@pytest.mark.parametrize(
    ("groups", "kwargs", "message"),
    [
        ([GOOD], {}, "at least 2 groups"),
        ([GOOD, GroupSummary(n=1, mean=1.0, m2=0.0, min=1.0, max=1.0)], {}, "group 1 has fewer"),
        ([CONSTANT, CONSTANT], {}, "every group has zero variance"),
        ([GOOD, (3, 2.0, 2.0, 1.0, 3.0)], {}, "group summary"),
        ([GOOD, GOOD], {"confidence_level": 1.0}, "confidence_level"),
        ([GOOD, GOOD], {"post_hoc": "yes"}, "post_hoc must be true or false"),
    ],
)
def test_bad_input_is_refused(groups: list, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        anova(groups, **kwargs)


@pytest.mark.parametrize("level", [0.95, 0.99])
def test_two_groups_agree_with_students_t_test(level: float) -> None:
    # With k = 2, F = t^2 and the studentized range is sqrt(2) |t|: one answer three ways.
    a, b = make_groups(4, (17, 29), 0.9)
    ref = stats.ttest_ind(a, b, equal_var=True)
    ref_ci = ref.confidence_interval(level)

    r = anova([summarize(a), summarize(b)], confidence_level=level)

    np.testing.assert_allclose(r.f_statistic, ref.statistic**2, rtol=RTOL, atol=0)
    np.testing.assert_allclose(r.p_value, ref.pvalue, rtol=RTOL, atol=0)
    (pair,) = r.post_hoc
    np.testing.assert_allclose(pair.p_value, ref.pvalue, rtol=RTOL, atol=0)
    np.testing.assert_allclose(pair.confidence_interval.lower, ref_ci.low, rtol=RTOL)
    np.testing.assert_allclose(pair.confidence_interval.upper, ref_ci.high, rtol=RTOL)
