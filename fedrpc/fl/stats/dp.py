"""Differentially private summaries of a numeric variable: the Gaussian mechanism on
per-device sums, calibrated by the same RDP accountant as the training ledger.

Each device contributes one value per question (the mean of its observations,
each clipped to ``[lower, upper]``) to one group. Centred at ``mid = (lower +
upper) / 2`` with ``R = (upper - lower) / 2``, a device adds
``(1, y / R, y^2 / R^2)`` to its group's ``(count, sum, sum of squares)``:
a vector of L2 norm at most ``sqrt(3)``. Adding Gaussian noise of standard
deviation ``z sqrt(3)`` to each normalised coordinate of every group is the
Gaussian mechanism with noise multiplier ``z`` for adding or removing one
device, so it is charged to the ledger as one step of ``(z, q = 1)``
(``docs/analytics.md``). Means, standard deviations and every test statistic
derived from the noised sums are post-processing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.privacy import RoundCharge, compose_epsilon
from fedrpc.fl.stats.summary import GroupSummary

__all__ = ["DeviceSums", "noise_multiplier_for", "noised_summary"]

#: L2 norm of one device's normalised contribution (1, y/R, y^2/R^2).
SENSITIVITY = math.sqrt(3.0)


@dataclass(frozen=True, slots=True)
class DeviceSums:
    """One group's exact sums over its devices' clipped, centred values ``y``."""

    n: int
    sum: float
    sum_squares: float


def noise_multiplier_for(epsilon: float, delta: float) -> float:
    """The smallest ``z`` (to 1e-6 relative) whose one release at ``q = 1`` costs at most
    ``epsilon`` at ``delta`` by the RDP accountant."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise InvalidInput("epsilon must be a positive number")

    def cost(z: float) -> float:
        return compose_epsilon([RoundCharge(z, 1.0, 1)], delta)

    lo, hi = 1e-3, 1.0
    while cost(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise InvalidInput("epsilon is too small for any noise this server adds")
    if cost(lo) <= epsilon:
        raise InvalidInput("epsilon is too large to calibrate: use a smaller one")
    while hi / lo > 1 + 1e-6:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if cost(mid) <= epsilon else (mid, hi)
    return hi


def noised_summary(
    sums: DeviceSums,
    lower: float,
    upper: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> GroupSummary | None:
    """The group's summary from its noised sums; None when the noised count is below 2.

    The count is rounded, the mean kept in ``[lower, upper]`` and ``M2`` at 0 or
    more: post-processing, which costs no privacy.
    """
    if not lower < upper:
        raise InvalidInput("lower must be below upper")
    mid, radius = (lower + upper) / 2, (upper - lower) / 2
    std = noise_multiplier * SENSITIVITY
    noise = rng.standard_normal(3) * std
    n = round(sums.n + noise[0])
    if n < 2:
        return None
    s = sums.sum + noise[1] * radius
    q = sums.sum_squares + noise[2] * radius**2
    mean = min(max(mid + s / n, lower), upper)
    m2 = max(q - s * s / n, 0.0)
    return GroupSummary(n, mean, m2, lower, upper)
