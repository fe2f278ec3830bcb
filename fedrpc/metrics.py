"""Prometheus metrics: the call counters, kept as plain numbers until a scrape."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """The call counters, kept as plain numbers and handed to Prometheus when it scrapes.

    prometheus_client's own Counter and Histogram take a lock per increment and
    look their children up by label tuple; at one call per request that was a
    tenth of a ``system.ping``. Calls are counted on the event loop's thread
    only, so plain numbers need no lock. The exposition is the same as
    theirs: ``fedrpc_calls_total{method,outcome}``, ``fedrpc_call_seconds``
    (a histogram per method) and ``fedrpc_errors_total{type}``, each with its
    ``_created`` samples.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # (method, outcome) -> [count, created, the method's latency list];
        # method -> [count per bucket..., +Inf, sum, created]; error type -> [count, created].
        self._calls: dict[tuple[str, str], list] = {}
        self._latency: dict[str, list[float]] = {}
        self._errors: dict[str, list[float]] = {}
        self.registry.register(self)

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        calls = self._calls.get((method, outcome))  # one lookup per call
        if calls is None:
            calls = self._calls[method, outcome] = [0, time.time(), self._latency_of(method)]
        calls[0] += 1
        latency = calls[2]
        latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency[-2] += seconds
        if outcome != "ok":
            self.error(outcome)

    def _latency_of(self, method: str) -> list[float]:
        latency = self._latency.get(method)
        if latency is None:
            latency = self._latency[method] = [0] * (len(LATENCY_BUCKETS) + 2) + [time.time()]
        return latency

    def error(self, type_: str) -> None:
        errors = self._errors.get(type_)
        if errors is None:
            errors = self._errors[type_] = [0, time.time()]
        errors[0] += 1

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "fedrpc_calls", "RPC calls by method and outcome", labels=["method", "outcome"]
        )
        for (method, outcome), (count, created, _) in list(self._calls.items()):
            calls.add_metric([method, outcome], count, created)
        latency = HistogramMetricFamily(
            "fedrpc_call_seconds", "RPC call latency by method", labels=["method"]
        )
        for method, values in list(self._latency.items()):
            cumulative = list(accumulate(values[:-2]))
            latency.add_metric(
                [method], list(zip(_BUCKET_NAMES, cumulative, strict=True)), values[-2]
            )
            latency.samples.append(
                Sample("fedrpc_call_seconds_created", {"method": method}, values[-1])
            )
        errors = CounterMetricFamily("fedrpc_errors", "RPC errors by data.type", labels=["type"])
        for type_, (count, created) in list(self._errors.items()):
            errors.add_metric([type_], count, created)
        return iter([calls, latency, errors])

    def render(self) -> bytes:
        return generate_latest(self.registry)


_BUCKET_NAMES = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
