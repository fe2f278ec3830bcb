"""Client selection for a round: Poisson sampling for DP rounds, else uniform or stratified.

Rounds with central differential privacy are selected by **Poisson
sampling** (:func:`poisson_select`): each eligible device is included
independently with probability ``q``, so the selection size is
Binomial(N, q). That is the sampling the privacy accountant
(:mod:`fedrpc.fl.privacy`, the Poisson-subsampled Gaussian mechanism)
assumes, and ``q`` is the rate it is charged with. Fixed-size sampling
without replacement (:func:`select_devices`), stratified or not, serves
rounds without DP; no accountant here is proven for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedrpc.fl._errors import InvalidInput

__all__ = ["poisson_rate", "poisson_select", "select_devices"]


def _quota(total: int, k: int, strata: dict[str, int]) -> dict[str, int]:
    """Largest-remainder apportionment of ``k`` picks over strata of the given sizes."""
    exact = {s: k * n / total for s, n in strata.items()}
    quota = {s: min(strata[s], math.floor(v)) for s, v in exact.items()}
    short = k - sum(quota.values())
    # Remainders decide who gets the leftover picks; ties broken by stratum name for determinism.
    for s in sorted(strata, key=lambda s: (-(exact[s] - math.floor(exact[s])), s)):
        if short == 0:
            break
        if quota[s] < strata[s]:
            quota[s] += 1
            short -= 1
    return quota


def select_devices(
    eligible: Sequence[tuple[str, str]],
    k: int,
    rng: np.random.Generator,
    *,
    fraction: float | None = None,
    stratify: bool = False,
) -> list[str]:
    """Pick devices uniformly at random without replacement.

    Parameters
    ----------
    eligible : sequence of (device_id, platform)
        The eligible population; its order does not matter (it is sorted first,
        so a seed reproduces a selection).
    k : int
        The most devices to pick (the round's target count).
    rng : numpy.random.Generator
        Seeded by the caller; the seed is recorded with the round.
    fraction : float, optional
        Pick at most ``ceil(fraction * len(eligible))`` devices.
    stratify : bool
        Keep each platform's share of the selection equal to its share of the
        population (largest-remainder rounding), sampling uniformly within each.

    Returns
    -------
    list of str
        The selected device ids, sorted.
    """
    if k < 1:
        raise InvalidInput("target_device_count must be at least 1")
    if fraction is not None and not 0 < fraction <= 1:
        raise InvalidInput("fraction must be in (0, 1]")
    population = sorted(eligible)
    n = len(population)
    if fraction is not None:
        k = min(k, math.ceil(fraction * n))
    k = min(k, n)
    if k == 0:
        return []
    if not stratify:
        picks = rng.choice(n, size=k, replace=False)
        return sorted(population[i][0] for i in picks)
    strata: dict[str, list[str]] = {}
    for device_id, platform in population:
        strata.setdefault(platform, []).append(device_id)
    quota = _quota(n, k, {s: len(ids) for s, ids in strata.items()})
    chosen: list[str] = []
    for stratum in sorted(strata):
        ids = strata[stratum]
        chosen += [ids[i] for i in rng.choice(len(ids), size=quota[stratum], replace=False)]
    return sorted(chosen)


def poisson_rate(target: int, eligible_count: int, fraction: float | None = None) -> float:
    """The inclusion probability of a Poisson-sampled round.

    ``q = min(1, target / eligible_count, fraction)``: the expected cohort
    ``q * eligible_count`` is the round's target device count, at most the
    given fraction of the eligible population (the same caps as
    :func:`select_devices`), and at most everyone.

    Parameters
    ----------
    target : int
        The round's ``target_device_count`` (>= 1).
    eligible_count : int
        N, the number of eligible devices (>= 1).
    fraction : float, optional
        ``criteria.fraction`` in (0, 1].

    Returns
    -------
    float
        q in (0, 1].
    """
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        raise InvalidInput("target_device_count must be at least 1")
    if (
        isinstance(eligible_count, bool)
        or not isinstance(eligible_count, int)
        or eligible_count < 1
    ):
        raise InvalidInput("Poisson sampling needs at least one eligible device")
    if fraction is not None and not 0 < fraction <= 1:
        raise InvalidInput("fraction must be in (0, 1]")
    return min(1.0, target / eligible_count, 1.0 if fraction is None else float(fraction))


def poisson_select(eligible: Sequence[str], q: float, rng: np.random.Generator) -> list[str]:
    """Include each eligible device independently with probability ``q``.

    The selection size is Binomial(len(eligible), q) and may be 0: an empty
    draw is a legitimate outcome, which the caller must handle.

    Parameters
    ----------
    eligible : sequence of str
        The eligible device ids; their order does not matter (they are sorted
        first, so a seed reproduces a selection).
    q : float
        The inclusion probability, in (0, 1].
    rng : numpy.random.Generator
        Seeded by the caller; the seed is recorded with the round.

    Returns
    -------
    list of str
        The selected device ids, sorted.
    """
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
        raise InvalidInput(f"the sampling rate must be in (0, 1], got {q!r}")
    if not isinstance(rng, np.random.Generator):
        raise InvalidInput("rng must be a numpy.random.Generator")
    population = sorted(set(eligible))
    if len(population) != len(eligible):
        raise InvalidInput("eligible device ids must be distinct")
    keep = rng.random(len(population)) < q
    return [d for d, k in zip(population, keep, strict=True) if k]
