"""Where the analytics bench's time goes: SQL statements by name, CPU of the server's own
functions during the ingest, PostgreSQL's CPU, and its own timing of one batch's insert."""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from _analytics_setup import BATCH, DEVICE, Fleet


class Statements:
    """Wall time per named SQL statement while active: ``fedrpc.db``'s ``_fetch`` and
    ``_execute`` patched in place, each call keyed by its query's name."""

    def __init__(self, queries: dict[str, Any]) -> None:
        self.names = {q.sql: name for name, q in queries.items()}
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __enter__(self) -> Statements:
        import fedrpc.db as db

        self._saved = db._fetch, db._execute
        db._fetch, db._execute = (self._timed(f) for f in self._saved)
        return self

    def __exit__(self, *exc: object) -> None:
        import fedrpc.db as db

        db._fetch, db._execute = self._saved

    def _timed(self, original: Any) -> Any:
        async def timed(conn: Any, sql: str, params: dict[str, Any]) -> Any:
            started = time.perf_counter()
            try:
                return await original(conn, sql, params)
            finally:
                name = self.names.get(sql, "other")
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def _stat(pid: int | str) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def postgres_cpu(postmaster: int) -> dict[str, float]:
    """CPU seconds of PostgreSQL's processes by kind: the connections' backends, the live
    background processes, and children that exited (autovacuum workers: reaped into the
    postmaster's children's time)."""
    tick = os.sysconf("SC_CLK_TCK")
    own = _stat(postmaster)
    out = {"backends": 0.0, "background": 0.0, "exited": (int(own[13]) + int(own[14])) / tick}
    out["background"] += (int(own[11]) + int(own[12])) / tick
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat(proc.name)
            if int(fields[1]) != postmaster:
                continue
            kind = "backends" if b"[local]" in (proc / "cmdline").read_bytes() else "background"
            out[kind] += (int(fields[11]) + int(fields[12])) / tick
    return out


#: The server's own functions timed during the ingest: (owner, attribute, label).
INGEST_PIECES = [
    ("fedrpc.rpc", "_parse", "JSON-RPC envelope parse (msgspec, params kept raw)"),
    ("fedrpc.rpc", "decode_params", "params decode + validation (msgspec ReportParams)"),
    ("fedrpc.services.analytics_data", "check_rows", "per-row checks (check_rows, Python loop)"),
    ("fedrpc.db", "refuse_nul", "NUL scan of every statement's parameters (refuse_nul)"),
    ("psycopg._queries", "PostgresQuery.dump", "psycopg parameter adaptation (arrays as text)"),
]


class IngestProbe:
    """CPU (this thread's) and wall seconds inside the server's own functions, patched in place:
    the synchronous pieces of INGEST_PIECES, which run on the event loop, and the handler's
    wall time (async: it overlaps across concurrent calls)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> IngestProbe:
        import importlib

        for module, path, label in INGEST_PIECES:
            owner: Any = importlib.import_module(module)
            *parents, attr = path.split(".")
            for part in parents:
                owner = getattr(owner, part)
            self._wrap(owner, attr, label)
        data = importlib.import_module("fedrpc.services.analytics_data")
        original = data.report

        async def handler(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.wall["handler"] += time.perf_counter() - started

        self._undo.append((data, "report", original))
        data.report = handler
        return self

    def _wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.cpu[label] += time.thread_time() - cpu
                self.wall[label] += time.perf_counter() - wall

        self._undo.append((owner, attr, original))
        setattr(owner, attr, timed)

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)


def explain_insert(conn: Any, sql: str, fleet: Fleet, n: int = BATCH) -> dict[str, float]:
    """PostgreSQL's own milliseconds for one n-row ``analytics.insert_observations`` as the
    server sends it (text parameters), from EXPLAIN ANALYZE in a rolled-back transaction:
    the whole statement and each foreign-key trigger (best of 3)."""
    import re
    from datetime import UTC, datetime, timedelta

    device = next(d for d in fleet.devices if d.group >= 0)
    now = datetime.now(UTC)
    params = {
        "device_id": device.id, "org_id": fleet.owner.id, "platform": DEVICE["platform"],
        "group_ids": [fleet.groups[device.group]], "variables": ["x"] * n,
        "values": np.random.default_rng(0).normal(10, 2, n).tolist(), "categories": [None] * n,
        "recorded_at": [now - timedelta(seconds=i) for i in range(n)],
    }  # fmt: skip
    runs = []
    for _ in range(3):
        with contextlib.suppress(_Rollback), conn.transaction():
            lines = [r[0] for r in conn.execute("EXPLAIN (ANALYZE) " + sql, params).fetchall()]
            raise _Rollback
        out = {"statement": float(re.search(r"Execution Time: ([\d.]+)", lines[-1]).group(1))}
        for line in lines:
            if m := re.search(r"Trigger for constraint (\w+): time=([\d.]+)", line):
                out[m.group(1)] = float(m.group(2))
        runs.append(out)
    return min(runs, key=lambda r: r["statement"])


class _Rollback(Exception):
    pass
