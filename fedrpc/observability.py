"""Prometheus metrics and the one JSON log line per call."""

from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

call_log = logging.getLogger("fedrpc.calls")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter("fedrpc_calls_total", "RPC calls by method and outcome",
                             ["method", "outcome"], registry=self.registry)
        self.latency = Histogram("fedrpc_call_seconds", "RPC call latency by method", ["method"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.errors = Counter("fedrpc_errors_total", "RPC errors by data.type", ["type"],
                              registry=self.registry)

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        self.calls.labels(method, outcome).inc()
        self.latency.labels(method).observe(seconds)
        if outcome != "ok":
            self.errors.labels(outcome).inc()

    def error(self, type_: str) -> None:
        self.errors.labels(type_).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_call(method: str, principal: str, seconds: float, request_id: str, outcome: str,
             code: int | None) -> None:
    if call_log.isEnabledFor(logging.INFO):
        fields = {"method": method, "principal": principal, "duration_ms": round(seconds * 1000, 3),
                  "request_id": request_id, "outcome": outcome}
        if code is not None:
            fields["code"] = code
        call_log.info("rpc.call", extra={"fields": fields})
