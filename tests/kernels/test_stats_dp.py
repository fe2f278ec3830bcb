"""The DP analytics kernel: calibration against dp-accounting, noise of the stated size."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats as sps

from fedrpc.fl import InvalidInput
from fedrpc.fl.stats import dp


def reference_epsilon(z: float, delta: float) -> float:
    """One Gaussian release (q = 1) by dp-accounting's RDP accountant."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z))
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize("epsilon", [0.3, 1.0, 4.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-7])
def test_the_noise_multiplier_is_the_smallest_that_costs_at_most_epsilon(epsilon, delta):
    z = dp.noise_multiplier_for(epsilon, delta)
    assert reference_epsilon(z, delta) <= epsilon * (1 + 1e-4)
    assert reference_epsilon(z * (1 - 1e-3), delta) > epsilon


def test_the_summary_is_exact_without_noise_and_refuses_bad_ranges():
    # Devices' clipped means 1, 2, 4 in [0, 4]: centred at 2, y = -1, 0, 2.
    sums = dp.DeviceSums(3, -1.0 + 0.0 + 2.0, 1.0 + 0.0 + 4.0)
    got = dp.noised_summary(sums, 0.0, 4.0, 1e-12, np.random.default_rng(0))
    assert got.n == 3
    assert got.mean == pytest.approx(np.mean([1, 2, 4]), rel=1e-9)
    assert got.m2 == pytest.approx(np.sum((np.array([1, 2, 4]) - 7 / 3) ** 2), rel=1e-9)
    with pytest.raises(InvalidInput):
        dp.noised_summary(sums, 4.0, 4.0, 1.0, np.random.default_rng(0))


def test_the_noise_has_the_stated_standard_deviation():
    z, radius = 0.8, 3.0
    sums = dp.DeviceSums(1000, 50.0, 2000.0)
    rng = np.random.default_rng(1)
    counts, means = [], []
    for _ in range(4000):
        s = dp.noised_summary(sums, -radius, radius, z, rng)
        counts.append(s.n)
        means.append(s.mean * s.n)  # the noised sum (mid = 0), up to the count's rounding
    sigma = z * math.sqrt(3)
    # The count is rounded: its variance is sigma^2 plus about 1/12 (Sheppard's correction).
    c = np.array(counts, dtype=np.float64)
    statistic = (c.size - 1) * c.var(ddof=1) / (sigma**2 + 1 / 12)
    assert sps.chi2.sf(statistic, c.size - 1) > 1e-4
    assert sps.chi2.cdf(statistic, c.size - 1) > 1e-4
    assert abs(c.mean() - 1000) < 5 * sigma / math.sqrt(c.size)
    noised_sum = np.array(means)
    assert abs(noised_sum.mean() - 50.0) < 5 * sigma * radius / math.sqrt(4000) + 1.0
