"""Combining the metrics that clients report with their updates."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["weighted_means"]


def weighted_means(reports: Iterable[tuple[Mapping[str, object], int]]) -> dict[str, float]:
    """Per metric name, the mean over the clients that reported it, weighted by their sample counts.

    Non-numeric and non-finite values are ignored, so one client's malformed
    report cannot poison the version's metrics. A metric reported by only
    some clients is averaged over those clients.
    """
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for metrics, samples in reports:
        for name, value in metrics.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                continue
            sums[name] = sums.get(name, 0.0) + float(value) * samples
            weights[name] = weights.get(name, 0) + samples
    return {name: sums[name] / weights[name] for name in sorted(sums) if weights[name] > 0}
