"""Combining the metrics that clients report with their updates, apart from the server's own.

A version's metrics hold two kinds of keys: the weighted means of what
devices reported (``loss``, ``accuracy``, any name a device chooses) and what
the server measured while aggregating (``dp_noise_std``, ``num_selected``).
The two namespaces are disjoint: :data:`SERVER_PREFIXES` and
:data:`SERVER_NAMES` are the server's, a device reporting one of them is
refused at upload (:func:`reserved_names`), and :func:`version_metrics`
drops any such name from client reports as well, so nothing a device sends
can set or impersonate a value the server reports. New server metrics take
the ``dp_`` or ``server_`` prefix (or join :data:`SERVER_NAMES`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = [
    "SERVER_NAMES",
    "SERVER_PREFIXES",
    "is_server_metric",
    "reserved_names",
    "version_metrics",
    "weighted_means",
]

#: Prefixes of the server's metric names (compared case-insensitively).
SERVER_PREFIXES = ("dp_", "server_", "secagg_")
#: Server metric names without such a prefix, and the names of the version's
#: own fields, which a client metric could be mistaken for.
SERVER_NAMES = frozenset(
    {
        "num_selected",
        "num_clipped",
        "num_updates",
        "fraction_clipped",
        "noise_std",
        "noise_multiplier",
        "clipping_norm",
        "total_samples",
        "epsilon",
        "delta",
    }
)


def is_server_metric(name: str) -> bool:
    """Whether ``name`` belongs to the server's namespace (case-insensitive)."""
    folded = name.lower()
    return folded in SERVER_NAMES or folded.startswith(SERVER_PREFIXES)


def reserved_names(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that only the server may report, sorted."""
    return sorted(n for n in names if is_server_metric(n))


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


def version_metrics(
    reports: Iterable[tuple[Mapping[str, object], int]], server: Mapping[str, float]
) -> dict[str, float]:
    """A version's metrics: the clients' weighted means, then the server's own.

    Client names in the server's namespace (updates stored before the upload
    check existed may hold some) and names the server reports this round are
    dropped from the clients' side, so the server's values are the only ones
    under its names. Every key the aggregation kernels report is reserved
    (a test checks it), so a device cannot fill in one the server left out.
    """
    clients = [
        ({n: v for n, v in m.items() if n not in server and not is_server_metric(n)}, s)
        for m, s in reports
    ]
    return {**weighted_means(clients), **server}
