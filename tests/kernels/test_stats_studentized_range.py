"""The vectorised studentized range against scipy, closed forms and high-precision values.

scipy's ``studentized_range.sf`` is ``1 - cdf`` with the cdf integrated to
1e-11 absolute, so it is the reference where p-values are not small (1e-9
relative or 1e-11 absolute); the tail is checked against values that keep
their relative precision there:

* two means: ``Q = sqrt(2) |T|`` with ``T ~ t(df)``, so
  ``sf(q) = 2 * t.sf(q / sqrt(2), df)`` (``2 * norm.sf(q / sqrt(2))`` for df = inf);
* more means: values from mpmath 1.3 at 20 significant digits, by nested
  ``mp.quad`` of ``E_S[R(q S)]``, ``R(w) = k int phi(z) (Phi(z)^(k-1) -
  (Phi(z) - Phi(z - w))^(k-1)) dz``, S the chi(df)/sqrt(df) variable.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedrpc.fl.stats._studentized_range import studentized_range_isf, studentized_range_sf

RTOL = 1e-9
SCIPY_ATOL = 1e-11


@pytest.mark.parametrize(
    ("k", "df"), [(2, 1), (3, 5), (3, 57), (5, 20), (10, 300), (50, 2001), (50, 150_000)]
)
def test_sf_and_isf_match_scipy(k: int, df: float) -> None:
    q = np.array([0.0, 0.01, 0.5, 1.5, 3.0, 4.5, 6.0, 8.0])

    ours = studentized_range_sf(q, k, df)

    np.testing.assert_allclose(ours, stats.studentized_range.sf(q, k, df), RTOL, SCIPY_ATOL)
    for level in (0.95, 0.99):
        np.testing.assert_allclose(
            studentized_range_isf(1 - level, k, df),
            stats.studentized_range.ppf(level, k, df),
            rtol=RTOL,
        )


@pytest.mark.parametrize("df", [1, 4, 30, 1000, 99_999, 100_000, math.inf])
def test_two_means_follow_the_t_distribution_into_the_far_tail(df: float) -> None:
    q = np.array([0.1, 1.0, 5.0, 12.0, 30.0, 60.0])
    if df >= 100_000:  # like scipy, the df = infinity form from there on
        exact = 2 * stats.norm.sf(q / math.sqrt(2))
    else:
        exact = 2 * stats.t.sf(q / math.sqrt(2), df)

    ours = studentized_range_sf(q, 2, df)

    np.testing.assert_allclose(ours, exact, rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    ("q", "k", "df", "reference"),
    [
        (5.0, 3, 5, 3.718271955988558e-02),
        (7.0, 3, 57, 2.051650062331449e-05),
        (8.0, 10, 300, 1.599378543325980e-06),
        (8.0, 50, 2001, 2.084065380641148e-05),
        (12.0, 50, 2001, 5.049953543974684e-14),
    ],
)
def test_tail_matches_high_precision_values(q: float, k: int, df: int, reference: float) -> None:
    assert studentized_range_sf(np.array([q]), k, df)[0] == pytest.approx(reference, rel=RTOL)


def test_sf_is_one_at_zero_and_decreases() -> None:
    q = np.linspace(0.0, 20.0, 81)

    p = studentized_range_sf(q, 7, 40)

    assert p[0] == 1.0
    assert np.all(np.diff(p) < 0)
