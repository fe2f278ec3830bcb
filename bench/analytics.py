"""Federated analytics (issue 12): 1M observations in 50 groups, each question against the pull-and-scipy path.

Issue 12's goal: every question under 1 s and faster than pulling the raw
column into numpy and running scipy in the same run; ingest through
analytics.report at >= 50k observations/s.

The server runs in this process (``create_app`` on a loopback port) on a
throwaway PostgreSQL (pgserver) and S3 (weed mini). A federation of an
owner and one member organization; the owner's devices sit in 50 of its own
device groups, 10 per group (``_analytics_setup``). The 50 groups are device
groups of the asking organization (group_by ``device_group``, the default)
rather than 50 member organizations: that is the grouping a federation
member asks about its own fleet with, the rows carry their device's groups
from the moment they are stored, and one owner and one member keep the
federation as the tests build it; the member's devices report the same
variable too, so the scope's filter has rows to leave out.

Ingest: every observation goes through ``analytics.report`` over HTTP,
batches of at most 10,000 (the server's ceiling), INGEST_CONCURRENCY devices
at a time, bodies encoded before the clock starts; wall clock from the first
call to the last answer. The server's own functions are timed in place
meanwhile (``IngestProbe``) with this process's and PostgreSQL's CPU time.

Questions, over HTTP as the owner's org admin, in rotating order and
alternating with their peer: descriptive with and without percentiles,
t_test between two groups, anova over the 50 groups with Tukey-Kramer post
hoc, chi_square of two categorical variables over the members' devices. The
peer (``_analytics_peer``) pulls the same rows through the same SQL scope
function with psycopg into numpy and computes with numpy/scipy (np.percentile,
ttest_ind, f_oneway and tukey_hsd, chi2_contingency). Every answer is
checked against the peer's. After the timed runs each question's SQL
statements are timed by name, and the rows of each pull are read once more
as binary COPY with nothing parsed: the floor of any pull-based path.

Run: ``.venv/bin/python bench/analytics.py`` (about 2.5 minutes; writes its
section of docs/benchmarks.md); ``--quick``: 100k observations, 3 runs,
written nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # _report, and fedrpc without an install

import _analytics_peer as peer  # noqa: E402
import _analytics_probe as probes  # noqa: E402
import _analytics_setup as setup  # noqa: E402
import psycopg  # noqa: E402
from _analytics_report import body  # noqa: E402
from _report import write_section  # noqa: E402

# 10 devices per group: the federation's default privacy floor counts devices (min_group_size 10).
FULL = {"numeric": 1_000_000, "devices_per_group": 10, "history": 100, "reps": 5}
QUICK = {"numeric": 100_000, "devices_per_group": 10, "history": 20, "reps": 3}
TUKEY_ONCE_ABOVE = 5.0  # seconds: a slower scipy tukey_hsd is timed in the first run only


@dataclass
class Question:
    key: str
    label: str
    method: str
    params: dict[str, Any]
    # The peer; its flag asks for the post hoc too (anova: scipy's tukey_hsd, timed apart).
    ask_peer: Callable[[psycopg.Connection, bool], peer.Timed]
    floor: list[tuple[str, dict]]  # the pulls' SQL and parameters, for the COPY floor
    runs: dict[str, list] = field(default_factory=lambda: {"ours": [], "peer": []})
    statements: dict[str, float] = field(default_factory=dict)
    answer: dict = field(default_factory=dict)
    peer_answer: Any = None


def questions(fleet: setup.Fleet) -> list[Question]:
    fed, org, groups = fleet.federation_id, fleet.owner.id, fleet.groups
    x, pair = peer.scope(fed, org, "x"), peer.scope(fed, org, "x", groups=groups[:2])
    a, b = (peer.scope(fed, org, v, "federation_member") for v in ("a", "b"))
    ask = {"federation_id": fed, "variable": "x"}
    numeric = [(peer.NUMERIC_SQL, x)]
    return [
        Question("descriptive", "descriptive, percentiles", "federations.analytics.descriptive",
                 ask, lambda c, _: peer.descriptive(c, x, True), numeric),
        Question("descriptive_plain", "descriptive, no percentiles",
                 "federations.analytics.descriptive", {**ask, "include_percentiles": False},
                 lambda c, _: peer.descriptive(c, x, False), numeric),
        Question("t_test", "t_test, 2 of the groups", "federations.analytics.t_test",
                 {**ask, "group_a": groups[0], "group_b": groups[1]},
                 lambda c, _: peer.t_test(c, pair), [(peer.NUMERIC_SQL, pair)]),
        Question("anova", f"anova, {len(groups)} groups + Tukey-Kramer",
                 "federations.analytics.anova", ask, lambda c, t: peer.anova(c, x, t), numeric),
        Question("chi_square", f"chi_square, {setup.CATEGORIES_1} x {setup.CATEGORIES_2}",
                 "federations.analytics.chi_square",
                 {"federation_id": fed, "variable_1": "a", "variable_2": "b"},
                 lambda c, _: peer.chi_square(c, a, b),
                 [(peer.CATEGORY_SQL, a), (peer.CATEGORY_SQL, b)]),
    ]  # fmt: skip


def post_hoc_due(q: Question, rep: int) -> bool:
    """Not in the warm-up (rep -1); after the first run only while scipy stays quick."""
    if rep <= 0:
        return rep == 0
    timed = [p.post_hoc for p in q.runs["peer"] if p.post_hoc is not None]
    return bool(timed) and min(timed) < TUKEY_ONCE_ABOVE


async def ask(stack: Any, q: Question, token: str) -> tuple[float, dict]:
    started = time.perf_counter()
    answer = await stack.api.ok(q.method, q.params, token)
    return time.perf_counter() - started, answer


async def run_once(stack: Any, conn: psycopg.Connection, q: Question, token: str, rep: int) -> None:
    """Ours and the peer, the order alternating by repetition."""
    for side in ("ours", "peer") if rep % 2 == 0 else ("peer", "ours"):
        gc.collect()
        if side == "ours":
            seconds, q.answer = await ask(stack, q, token)
            q.runs["ours"].append(seconds)
        else:
            q.peer_answer = await asyncio.to_thread(q.ask_peer, conn, post_hoc_due(q, rep))
            q.runs["peer"].append(q.peer_answer)


async def measure(stack: Any, conn: psycopg.Connection, qs: list[Question], token: str, reps: int) -> None:  # fmt: skip
    for q in qs:  # warm-up, not recorded: plans, caches, the first connection of each kind
        await run_once(stack, conn, q, token, -1)
        q.runs = {k: [] for k in q.runs}
    for rep in range(reps):
        for q in qs[rep % len(qs) :] + qs[: rep % len(qs)]:
            await run_once(stack, conn, q, token, rep)
            print(f"run {rep} {q.key}: ours {q.runs['ours'][-1] * 1e3:.0f} ms, "
                  f"peer {q.runs['peer'][-1].total * 1e3:.0f} ms", flush=True)  # fmt: skip
    with probes.Statements(stack.services.db.queries) as statements:
        for q in qs:
            runs = []
            for _ in range(3):
                statements.reset()
                await ask(stack, q, token)
                runs.append(dict(statements.seconds))
            q.statements = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}


def copy_floor(conn: psycopg.Connection, q: Question) -> float:
    return min(sum(peer.copy_floor(conn, sql, p)[0] for sql, p in q.floor) for _ in range(3))


@contextlib.contextmanager
def services() -> Iterator[tuple[Any, Any]]:
    """A throwaway PostgreSQL (its pid for CPU time) and S3 server."""
    from fedrpc.embedded import EmbeddedPostgres, EmbeddedS3

    with EmbeddedPostgres.temporary() as pg, EmbeddedS3.temporary() as s3:
        yield pg, s3


async def run(pg: Any, s3: Any, size: dict[str, int]) -> dict[str, Any]:
    from _e2e_setup import stack

    out: dict[str, Any] = {}
    async with stack(pg.url, s3) as st:
        started = time.perf_counter()
        fleet = await setup.build(st, size["devices_per_group"])
        reports = setup.reports(fleet, size["numeric"], size["history"])
        out["setup"] = time.perf_counter() - started
        gc.collect()
        with probes.IngestProbe() as probe, probes.Statements(st.services.db.queries) as stmts:
            cpu, pg_cpu = time.process_time(), probes.postgres_cpu(pg.pid)
            wall = await setup.ingest(st, reports.calls, setup.INGEST_CONCURRENCY)
            after = probes.postgres_cpu(pg.pid)
            cpu, pg_cpu = time.process_time() - cpu, {k: after[k] - pg_cpu[k] for k in after}
        out["ingest"] = {"wall": wall, "cpu": cpu, "pg_cpu": pg_cpu, "reports": reports.summary(),
                         "cpu_pieces": dict(probe.cpu), "wall_pieces": dict(probe.wall),
                         "statements": dict(stmts.seconds)}  # fmt: skip
        print(f"ingest: {reports.observations:,} observations in {wall:.1f} s "
              f"({reports.observations / wall:,.0f}/s)", flush=True)  # fmt: skip
        del reports
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) analytics_observations")
            sql = st.services.db.queries["analytics.insert_observations"].sql
            out["ingest"]["explain"] = probes.explain_insert(conn, sql, fleet)
            qs = questions(fleet)
            await measure(st, conn, qs, fleet.owner.token, size["reps"])
            floors: dict[str, float] = {}  # one per distinct pull: the same rows, the same bytes
            for q in qs:
                floors.setdefault(repr(q.floor), copy_floor(conn, q))
            out["floors"] = {q.key: floors[repr(q.floor)] for q in qs}
            out["postgres"] = conn.execute("SHOW server_version").fetchone()[0]
            out["settings"] = dict(conn.execute(
                "SELECT name, current_setting(name) FROM pg_settings "
                "WHERE name IN ('work_mem', 'shared_buffers', 'max_parallel_workers_per_gather')"
            ).fetchall())  # fmt: skip
        out["questions"], out["fleet"] = qs, fleet
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k observations; write nothing")
    quick = parser.parse_args().quick
    size = QUICK if quick else FULL
    started = time.perf_counter()
    with services() as (pg, s3):
        out = asyncio.run(run(pg, s3, size))
    text = body(out, size, time.perf_counter() - started)
    print(text)
    if not quick:
        write_section(
            "analytics", "Federated analytics vs pulling the rows into numpy and scipy", text
        )


if __name__ == "__main__":
    main()
