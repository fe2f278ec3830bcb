"""Client selection for a round: uniform sampling without replacement, optionally stratified.

Uniform selection among the eligible population is what the privacy analysis
of subsampled mechanisms assumes; the sampling rate passed to the accountant
is ``len(selected) / len(eligible)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedrpc.fl._errors import InvalidInput

__all__ = ["select_devices"]


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
