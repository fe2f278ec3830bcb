"""Per-group summaries, their exact combination, and descriptive statistics.

Postgres reduces each group of observations to ``n``, the mean, ``M2`` (the
sum of squared deviations from the group mean), min and max; the kernels
never see the values. Groups combine with the k-group form of the update of
Chan, Golub & LeVeque 1979 ("Updating formulae and a pairwise algorithm for
computing sample variances"): ``M2 = sum M2_i + sum n_i (mean_i - mean)^2``.
It never subtracts a sum of squares from another, so values like ``1e8 + x``
keep their variance; a textbook ``sum x^2 - n mean^2`` would lose it.

Percentiles cannot be combined from group summaries: the overall median
comes from SQL over all rows (``percentile_cont``), and the overall
description is ``describe(merge(groups), overall_percentiles)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fedrpc.fl._errors import InvalidInput

__all__ = ["Description", "GroupSummary", "describe", "merge"]


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"{name} must be a number")
    if not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number")
    return float(value)


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """What SQL reports for one group of numeric observations.

    Attributes
    ----------
    n : int
        Number of observations, >= 1.
    mean : float
        Their mean.
    m2 : float
        ``sum((x - mean)**2)`` over the group, >= 0; 0 when ``n == 1``.
    min, max : float
        Smallest and largest observation.
    """

    n: int
    mean: float
    m2: float
    min: float
    max: float

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, numbers.Integral) or self.n < 1:
            raise InvalidInput("n must be a whole number of at least 1")
        # Store plain int and floats (not numpy scalars), so results are plain too.
        object.__setattr__(self, "n", int(self.n))
        for name in ("mean", "m2", "min", "max"):
            object.__setattr__(self, name, _finite(getattr(self, name), name))
        if self.m2 < 0:
            raise InvalidInput("m2, a sum of squared deviations, cannot be negative")
        if self.n == 1 and self.m2 != 0:
            raise InvalidInput("m2 must be 0 for a group of one observation")
        if self.min > self.max:
            raise InvalidInput("min cannot be greater than max")

    @property
    def variance(self) -> float | None:
        """Sample variance ``m2 / (n - 1)`` (ddof=1); None when ``n < 2``."""
        return self.m2 / (self.n - 1) if self.n >= 2 else None

    @property
    def std_dev(self) -> float | None:
        """Sample standard deviation ``sqrt(m2 / (n - 1))`` (ddof=1); None when ``n < 2``."""
        variance = self.variance
        return math.sqrt(variance) if variance is not None else None


def pooled(groups: list[GroupSummary]) -> tuple[int, float, float, float]:
    """``(n, mean, ss_within, ss_between)`` of the union of ``groups``.

    ``ss_within = sum M2_i`` and ``ss_between = sum n_i (mean_i - mean)^2``;
    their sum is the union's M2. Sums use ``math.fsum`` (correctly rounded).
    """
    if not groups:
        raise InvalidInput("there are no groups to combine")
    if not all(isinstance(g, GroupSummary) for g in groups):
        raise InvalidInput("every group must be a group summary")
    n = sum(g.n for g in groups)
    # Measured from the first group's mean the shifts are small (exact for
    # nearby means), so a large common offset costs the weighted mean no digits.
    anchor = groups[0].mean
    mean = anchor + math.fsum(g.n * (g.mean - anchor) for g in groups) / n
    ss_within = math.fsum(g.m2 for g in groups)
    ss_between = math.fsum(g.n * (g.mean - mean) ** 2 for g in groups)
    return n, mean, ss_within, ss_between


def merge(groups: Iterable[GroupSummary]) -> GroupSummary:
    """The summary of the union of ``groups`` (Chan, Golub & LeVeque 1979).

    Raises
    ------
    InvalidInput
        When ``groups`` is empty.
    """
    groups = list(groups)
    n, mean, ss_within, ss_between = pooled(groups)
    return GroupSummary(
        n=n,
        mean=mean,
        m2=ss_within + ss_between,
        min=min(g.min for g in groups),
        max=max(g.max for g in groups),
    )


@dataclass(frozen=True, slots=True)
class Description:
    """Descriptive statistics of one group (or of all, from :func:`merge`).

    ``std_dev`` and ``variance`` use ddof=1 and are None for a single
    observation. ``percentiles`` holds ``(fraction, value)`` pairs sorted by
    fraction, as SQL's ``percentile_cont`` (numpy's "linear" method) gave them.
    """

    count: int
    mean: float
    median: float
    std_dev: float | None
    variance: float | None
    min: float
    max: float
    percentiles: tuple[tuple[float, float], ...]


def describe(summary: GroupSummary, percentiles: Mapping[float, float]) -> Description:
    """Count, mean, median, spread and range of a group.

    Parameters
    ----------
    summary : GroupSummary
        The group's summary.
    percentiles : mapping of float to float
        ``percentile_cont`` results by fraction in [0, 1]; must hold the
        median, fraction 0.5.

    Raises
    ------
    InvalidInput
        On a fraction outside [0, 1], a non-finite value or a missing median.
    """
    if not isinstance(summary, GroupSummary):
        raise InvalidInput("summary must be a group summary")
    if not isinstance(percentiles, Mapping):
        raise InvalidInput("percentiles must map fractions in [0, 1] to values")
    pairs = []
    for fraction, value in percentiles.items():
        fraction = _finite(fraction, "a percentile's fraction")
        if not 0.0 <= fraction <= 1.0:
            raise InvalidInput("percentile fractions must be between 0 and 1, e.g. 0.5")
        pairs.append((fraction, _finite(value, f"the percentile at {fraction:g}")))
    pairs.sort()
    medians = [value for fraction, value in pairs if fraction == 0.5]
    if not medians:
        raise InvalidInput("percentiles must include the median (fraction 0.5)")
    return Description(
        count=summary.n,
        mean=summary.mean,
        median=medians[0],
        std_dev=summary.std_dev,
        variance=summary.variance,
        min=summary.min,
        max=summary.max,
        percentiles=tuple(pairs),
    )
