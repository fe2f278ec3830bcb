"""Group summaries, their combination and descriptive statistics, against numpy on the raw values.

Every reference is computed from the raw observations with numpy in
float64; the kernels only see what SQL would report per group (``n``, mean,
``M2 = sum((x - mean)**2)``, min, max, ``percentile_cont`` values).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrpc.fl import InvalidInput
from fedrpc.fl.stats import GroupSummary, describe, merge

RTOL = 1e-9


def summarize(x: np.ndarray) -> GroupSummary:
    """What Postgres reports for one group."""
    mean = float(np.mean(x))
    return GroupSummary(
        n=x.size, mean=mean, m2=float(np.sum((x - mean) ** 2)), min=x.min(), max=x.max()
    )


def offset_groups(seed: int) -> list[np.ndarray]:
    """Values 1e8 + N(0, 1) in groups of unequal sizes: a large offset, a small spread."""
    rng = np.random.default_rng(seed)
    return [1e8 + rng.standard_normal(size) for size in (700, 1500, 3000, 900, 2400)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_merge_of_offset_groups_matches_numpy_on_the_raw_values(seed: int) -> None:
    groups = offset_groups(seed)
    raw = np.concatenate(groups)

    merged = merge(summarize(g) for g in groups)

    assert merged.n == raw.size
    np.testing.assert_allclose(merged.mean, np.mean(raw), rtol=RTOL, atol=0)
    np.testing.assert_allclose(merged.variance, np.var(raw, ddof=1), rtol=RTOL, atol=0)
    np.testing.assert_allclose(merged.std_dev, np.std(raw, ddof=1), rtol=RTOL, atol=0)
    assert (merged.min, merged.max) == (raw.min(), raw.max())


def test_offset_data_defeats_the_textbook_sum_of_squares() -> None:
    # The data above would expose a kernel using sum(x^2) - n mean^2.
    raw = np.concatenate(offset_groups(1))
    naive = (np.sum(raw**2) - raw.size * np.mean(raw) ** 2) / (raw.size - 1)

    assert abs(naive / np.var(raw, ddof=1) - 1) > 1e-3


def test_merge_does_not_depend_on_grouping_or_order() -> None:
    rng = np.random.default_rng(7)
    parts = [rng.normal(loc, 3.0, size) for loc, size in ((5, 40), (-2, 13), (100, 77), (0, 1))]
    raw = np.concatenate(parts)
    s = [summarize(p) for p in parts]

    nested = merge([merge(s[:2]), merge(s[2:])])
    reversed_ = merge(reversed(s))

    for m in (nested, reversed_):
        assert m.n == raw.size
        np.testing.assert_allclose(m.mean, raw.mean(), rtol=RTOL, atol=0)
        np.testing.assert_allclose(m.std_dev, raw.std(ddof=1), rtol=RTOL, atol=0)


def test_numpy_scalars_are_stored_as_plain_numbers() -> None:
    x = np.array([1.0, 2.0, 4.0])

    s = summarize(x)

    assert [type(v) for v in (s.n, s.mean, s.m2, s.min, s.max)] == [int] + [float] * 4


def test_merge_of_one_group_is_that_group() -> None:
    g = summarize(np.array([1.0, 2.0, 4.0]))

    assert merge([g]) == g


@pytest.mark.parametrize("size", [1, 2, 9, 500])
def test_describe_matches_numpy(size: int) -> None:
    x = np.random.default_rng(size).gamma(2.0, 3.0, size)
    fractions = (0.05, 0.25, 0.5, 0.75, 0.95)
    # percentile_cont interpolates linearly, as numpy's default method.
    sql_percentiles = {f: float(np.percentile(x, 100 * f)) for f in fractions}

    d = describe(summarize(x), sql_percentiles)

    assert d.count == size
    np.testing.assert_allclose(d.mean, np.mean(x), rtol=RTOL, atol=0)
    assert d.median == np.median(x)
    assert (d.min, d.max) == (x.min(), x.max())
    assert [f for f, _ in d.percentiles] == list(fractions)
    if size == 1:
        assert d.std_dev is None and d.variance is None
    else:
        np.testing.assert_allclose(d.std_dev, np.std(x, ddof=1), rtol=RTOL, atol=0)
        np.testing.assert_allclose(d.variance, np.var(x, ddof=1), rtol=RTOL, atol=0)


def test_overall_description_is_the_merge_of_the_groups() -> None:
    rng = np.random.default_rng(11)
    groups = [rng.normal(20.0, 4.0, size) for size in (30, 45, 12)]
    raw = np.concatenate(groups)

    d = describe(merge(summarize(g) for g in groups), {0.5: float(np.median(raw))})

    assert d.count == raw.size
    np.testing.assert_allclose(d.mean, raw.mean(), rtol=RTOL, atol=0)
    np.testing.assert_allclose(d.std_dev, raw.std(ddof=1), rtol=RTOL, atol=0)
    assert d.percentiles == ((0.5, float(np.median(raw))),)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n": 0}, "n must be"),
        ({"n": 2.0}, "n must be"),
        ({"n": True}, "n must be"),
        ({"mean": math.nan}, "mean must be a finite"),
        ({"mean": "1.5"}, "mean must be a number"),
        ({"max": math.inf}, "max must be a finite"),
        ({"m2": -1e-3}, "cannot be negative"),
        ({"min": 5.0}, "min cannot be greater than max"),
        ({"n": 1, "m2": 0.5}, "must be 0 for a group of one"),
    ],
)
def test_inconsistent_summary_is_refused(fields: dict, message: str) -> None:
    good = {"n": 3, "mean": 2.0, "m2": 2.0, "min": 1.0, "max": 3.0}

    with pytest.raises(InvalidInput, match=message):
        GroupSummary(**{**good, **fields})


def test_merging_nothing_is_refused() -> None:
    with pytest.raises(InvalidInput, match="no groups"):
        merge([])


@pytest.mark.parametrize(
    ("percentiles", "message"),
    [
        ({0.25: 1.0}, "must include the median"),
        ({0.5: 2.0, 1.5: 3.0}, "between 0 and 1"),
        ({0.5: math.nan}, "finite"),
        ([2.0], "must map fractions"),
    ],
)
def test_bad_percentiles_are_refused(percentiles: object, message: str) -> None:
    summary = GroupSummary(n=3, mean=2.0, m2=2.0, min=1.0, max=3.0)

    with pytest.raises(InvalidInput, match=message):
        describe(summary, percentiles)
