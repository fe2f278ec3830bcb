"""Two-sample t-test from summaries against ``scipy.stats.ttest_ind`` on the raw values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from fedrpc.fl import InvalidInput
from fedrpc.fl.stats import GroupSummary, t_test

RTOL = 1e-9


def summarize(x: np.ndarray) -> GroupSummary:
    """What Postgres reports for one group."""
    mean = float(np.mean(x))
    return GroupSummary(
        n=x.size, mean=mean, m2=float(np.sum((x - mean) ** 2)), min=x.min(), max=x.max()
    )


def assert_close(actual: float, expected: float, scale: float = 0.0) -> None:
    """Relative 1e-9; a value near 0 is held to 1e-9 of ``scale``, the size of what it is made of."""
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale)


SAMPLES = {
    # unequal sizes and spreads, a moderate difference
    "unequal": ((0, 37, 10.0, 2.0), (1, 81, 11.2, 3.5)),
    # a clear difference: p-value far in the tail
    "clear": ((2, 120, 50.0, 1.0), (3, 60, 45.0, 4.0)),
    # no real difference, large offset
    "null": ((4, 15, 1e6, 0.3), (5, 22, 1e6, 0.3)),
    # the smallest groups a t-test takes
    "tiny": ((6, 2, 0.0, 1.0), (7, 3, 1.0, 1.0)),
}


def sample(seed: int, n: int, loc: float, scale: float) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, scale, n)


@pytest.mark.parametrize("case", sorted(SAMPLES))
@pytest.mark.parametrize("equal_var", [False, True])
@pytest.mark.parametrize("level", [0.95, 0.99])
def test_t_test_matches_scipy_on_raw_values(case: str, equal_var: bool, level: float) -> None:
    a, b = (sample(*spec) for spec in SAMPLES[case])
    ref = stats.ttest_ind(a, b, equal_var=equal_var)
    ref_ci = ref.confidence_interval(level)
    pooled_sd = math.sqrt(
        ((a.size - 1) * np.var(a, ddof=1) + (b.size - 1) * np.var(b, ddof=1))
        / (a.size + b.size - 2)
    )

    r = t_test(summarize(a), summarize(b), confidence_level=level, equal_var=equal_var)

    assert_close(r.t_statistic, ref.statistic)
    assert_close(r.p_value, ref.pvalue)
    assert_close(r.degrees_of_freedom, ref.df)
    half_width = (ref_ci.high - ref_ci.low) / 2
    assert_close(r.mean_difference, np.mean(a) - np.mean(b), scale=half_width)
    assert_close(r.confidence_interval.lower, ref_ci.low, scale=half_width)
    assert_close(r.confidence_interval.upper, ref_ci.high, scale=half_width)
    assert r.confidence_interval.level == level
    assert_close(r.cohens_d, (np.mean(a) - np.mean(b)) / pooled_sd, scale=1.0)
    assert r.significant == (ref.pvalue < 1 - level)


def test_welch_and_student_differ_when_spreads_and_sizes_differ() -> None:
    a, b = (sample(*spec) for spec in SAMPLES["unequal"])

    welch = t_test(summarize(a), summarize(b))
    student = t_test(summarize(a), summarize(b), equal_var=True)

    assert welch.degrees_of_freedom != student.degrees_of_freedom == a.size + b.size - 2
    assert welch.cohens_d == student.cohens_d


def test_one_constant_group_is_fine() -> None:
    a, b = np.full(5, 3.0), sample(8, 9, 4.0, 1.0)
    with warnings.catch_warnings():
        # scipy warns that a constant sample's moments may be imprecise; these are exact.
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = stats.ttest_ind(a, b, equal_var=False)

    r = t_test(summarize(a), summarize(b))

    assert_close(r.t_statistic, ref.statistic)
    assert_close(r.p_value, ref.pvalue)
    assert_close(r.degrees_of_freedom, ref.df)


def test_a_group_of_one_is_refused() -> None:
    one = GroupSummary(n=1, mean=2.0, m2=0.0, min=2.0, max=2.0)
    two = GroupSummary(n=2, mean=2.0, m2=0.5, min=1.5, max=2.5)

    with pytest.raises(InvalidInput, match="group a needs at least 2 observations"):
        t_test(one, two)
    with pytest.raises(InvalidInput, match="group b needs at least 2 observations"):
        t_test(two, one)


def test_two_constant_groups_are_refused() -> None:
    a = GroupSummary(n=4, mean=2.0, m2=0.0, min=2.0, max=2.0)
    b = GroupSummary(n=3, mean=5.0, m2=0.0, min=5.0, max=5.0)

    with pytest.raises(InvalidInput, match="both groups have zero variance"):
        t_test(a, b, equal_var=True)


@pytest.mark.parametrize("level", [0, 1, 1.5, -0.2, math.nan, True, "0.95", None])
def test_confidence_level_outside_0_1_is_refused(level: object) -> None:
    a = GroupSummary(n=3, mean=2.0, m2=2.0, min=1.0, max=3.0)

    with pytest.raises(InvalidInput, match="confidence_level"):
        t_test(a, a, confidence_level=level)


def test_equal_var_must_be_a_flag() -> None:
    a = GroupSummary(n=3, mean=2.0, m2=2.0, min=1.0, max=3.0)

    with pytest.raises(InvalidInput, match="equal_var must be true or false"):
        t_test(a, a, equal_var="false")
