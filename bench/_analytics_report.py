"""The analytics bench's section: answers checked against the peer's, then the tables."""

from __future__ import annotations

import math
import statistics
from typing import Any

import _analytics_probe as probes
import _analytics_setup as setup
import numpy as np
import psycopg
import scipy
from _report import table

med = statistics.median
GOAL_SECONDS = 1.0  # every question
GOAL_INGEST = 50_000  # observations per second through analytics.report


def _rel(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), 1e-300)


def _describe_diff(ours: dict, want: dict) -> float:
    worst = 0.0
    pairs = [(g, want["groups"][g["group_id"]]) for g in ours["groups"]]
    for got, exp in [*pairs, (ours["overall"], want["overall"])]:
        if got["count"] != exp["count"]:
            return math.inf
        worst = max(worst, _rel(got["mean"], exp["mean"]), _rel(got["std_dev"], exp["std_dev"]))
        if "p25" in exp:
            pct = got["percentiles"]
            worst = max(worst, *(_rel(pct[k], exp[k]) for k in ("p25", "p50", "p75")))
    return worst


def check(key: str, ours: dict, want: dict) -> float:
    """The largest difference between our answer and the peer's: relative for statistics,
    means and percentiles, absolute for p-values; inf when counts or tables differ."""
    if key.startswith("descriptive"):
        return _describe_diff(ours, want)
    if key == "t_test":
        return max(_rel(ours["t_statistic"], want["t_statistic"]), abs(ours["p_value"] - want["p_value"]))  # fmt: skip
    if key == "anova":
        worst = max(_rel(ours["f_statistic"], want["f_statistic"]), abs(ours["p_value"] - want["p_value"]))  # fmt: skip
        if ours["groups"] != want["groups"]:
            return math.inf
        hsd, index = want.get("tukey_pvalue"), {g: i for i, g in enumerate(ours["groups"])}
        for pair in ours.get("post_hoc_pairs", []) if hsd is not None else []:
            i, j = index[pair["group_a"]], index[pair["group_b"]]
            worst = max(worst, abs(pair["p_value"] - hsd[i, j]))
        return worst
    if ours["observed"]["counts"] != want["observed"].tolist():
        return math.inf
    return max(_rel(ours["chi_square_statistic"], want["chi_square_statistic"]), abs(ours["p_value"] - want["p_value"]))  # fmt: skip


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _question_rows(out: dict[str, Any]) -> tuple[list[list], list[list]]:
    rows, detail = [], []
    for q in out["questions"]:
        timed = [p.post_hoc for p in q.runs["peer"] if p.post_hoc is not None]
        post_hoc = med(timed) if timed else 0.0
        # A run without tukey_hsd (it was slow in the first) gets the median of the timed ones.
        peers = [p.pull + p.compute + (p.post_hoc if p.post_hoc is not None else post_hoc)
                 for p in q.runs["peer"]]  # fmt: skip
        ours = q.runs["ours"]
        ratio = med(p / o for p, o in zip(peers, ours, strict=True))
        under = med(ours) < GOAL_SECONDS
        rows.append([
            f"{q.label} ({q.peer_answer.rows:,} rows)",
            f"{ms(min(ours))} / {ms(med(ours))}",
            f"{ms(min(peers))} / {ms(med(peers))}",
            f"**{ratio:.2f}x**",
            f"{'met' if under and ratio > 1 else 'NOT met'} ({'under' if under else 'over'} 1 s, "
            f"{'faster' if ratio > 1 else 'slower'} than the peer)",
            ms(out["floors"][q.key]),
            f"{check(q.key, q.answer, q.peer_answer.answer):.1e}",
        ])  # fmt: skip
        pull = med(p.pull for p in q.runs["peer"])
        compute = med(p.compute for p in q.runs["peer"])
        peer_work = f"pull {ms(pull)}, numpy/scipy {ms(compute)}"
        if q.key == "anova":
            alone = med((p.pull + p.compute) / o for p, o in zip(q.runs["peer"], ours, strict=True))
            peer_work = (
                f"pull {ms(pull)}, f_oneway {ms(compute)}, tukey_hsd {ms(post_hoc)} "
                f"({len(timed)} of {len(ours)} runs); without tukey_hsd the peer / ours is "
                f"{alone:.2f}x"
            )
        statements = ", ".join(
            f"{name.rsplit('.', 1)[1]} {ms(s)}"
            for name, s in sorted(q.statements.items(), key=lambda kv: -kv[1])
        )
        detail.append([q.label, peer_work, statements])
    return rows, detail


def _ingest_rows(ingest: dict[str, Any]) -> tuple[list[list], list[list]]:
    r, wall = ingest["reports"], ingest["wall"]
    rate = r["observations"] / wall
    head = [[
        f"{r['observations']:,} ({r['numeric']:,} numeric + {r['categorical']:,} categorical)",
        f"{r['calls']} (one per device, {r['observations'] / r['calls']:,.0f} observations on "
        f"average; ceiling {setup.BATCH:,}), {setup.INGEST_CONCURRENCY} at a time",
        f"{r['bytes'] / 1e6:.0f}",
        f"{wall:.1f}",
        f"**{rate:,.0f}**",
        f"{'met' if rate >= GOAL_INGEST else 'NOT met'}",
    ]]  # fmt: skip
    per10k = 1e4 / r["observations"]

    def row(label: str, cpu: float | None, wall_s: float | None) -> list[str]:
        return [
            label,
            "" if cpu is None else f"{cpu:.2f}",
            "" if wall_s is None else f"{wall_s:.2f} ({wall_s / wall:.0%})",
            "" if cpu is None else ms(cpu * per10k),
        ]

    cpu, walls = ingest["cpu_pieces"], ingest["wall_pieces"]
    pieces = [row(label, cpu.get(label, 0.0), walls.get(label, 0.0)) for _, _, label in probes.INGEST_PIECES]  # fmt: skip
    insert, pg = ingest["statements"].get("analytics.insert_observations", 0.0), ingest["pg_cpu"]
    others = sum(ingest["statements"].values()) - insert
    pieces += [
        row("- insert_observations statement, wall per call summed (dump above + PostgreSQL)", None, insert),
        row("- the transaction's 4 other statements, wall summed (waiting for the loop too)", None, others),
        row("- analytics.report handler, wall per call summed (overlapping)", None, walls.get("handler", 0.0)),
        row("CPU of this process (server + load generator)", ingest["cpu"], None),
        row(f"CPU of PostgreSQL, all its processes ({pg['backends']:.2f} s in the pool's "
            f"connections, {pg['background'] + pg['exited']:.2f} s background and autovacuum)",
            sum(pg.values()), None),
    ]  # fmt: skip
    explain = ingest["explain"]
    rows = setup.BATCH / 1e4
    pieces.append([f"PostgreSQL executing one {setup.BATCH:,}-row insert_observations (EXPLAIN "
                   "ANALYZE, rolled back, best of 3)", "", "", ms(explain["statement"] / 1e3 / rows)])  # fmt: skip
    for name, value in explain.items():
        if name != "statement":
            pieces.append([f"- its trigger {name} (one lookup per row)", "", "", ms(value / 1e3 / rows)])  # fmt: skip
    return head, pieces


def body(out: dict[str, Any], size: dict[str, int], elapsed: float) -> str:
    rows, detail = _question_rows(out)
    head, pieces = _ingest_rows(out["ingest"])
    fleet, settings = out["fleet"], out["settings"]
    owners = sum(1 for d in fleet.devices if d.group >= 0)
    return "\n\n".join([
        table(["question", "ours ms, best / median", "peer ms (pull + numpy/scipy), best / median",
               "peer / ours (median of runs)", "goal: under 1 s and faster than the peer",
               "floor: binary COPY of the rows alone, ms", "max diff vs peer"], rows),
        table(["question", "peer's time (medians, ms)", "our SQL statements (median of 3, ms)"],
              detail),
        table(["ingested through analytics.report", "calls", "request MB", "wall s",
               "observations/s", "goal >= 50k/s"], head),
        table(["where the ingest's time goes", "CPU s", "wall s (of the ingest's)",
               "CPU ms per 10k observations"], pieces),
        f"`python bench/analytics.py`: the server runs in the bench's process (create_app on a "
        f"loopback port) with a throwaway PostgreSQL {out['postgres']} (pgserver, its defaults: "
        f"work_mem {settings['work_mem']}, shared_buffers {settings['shared_buffers']}, "
        f"max_parallel_workers_per_gather "
        f"{settings['max_parallel_workers_per_gather']}) and S3 (weed mini), all on the same 2 "
        f"cores. A federation of an owner and one member organization (min_group_size 10); "
        f"{owners} owner devices, {size['devices_per_group']} in each of the owner's "
        f"{len(fleet.groups)} device groups, report {size['numeric']:,} values of `x` (group g: "
        f"N(10 + 0.02 g, (1.5 + 0.01 g)^2)); {setup.MEMBER_DEVICES} member devices report "
        f"{setup.MEMBER_VALUES:,} each (outside the owner's groups, filtered out by the scope), "
        f"and every device a history of {size['history']} categories of `a` and of `b` (the "
        f"latest counts). The groups are the asking organization's device groups "
        f"(group_by device_group, the default): the grouping an organization asks about its own "
        f"fleet with, with one owner and one member as the tests build a federation. Ingest: "
        f"bodies encoded before the clock, {setup.INGEST_CONCURRENCY} devices posting at once; "
        f"the pieces are times inside the server's own functions, summed over calls: the "
        f"synchronous ones run on the event loop's one thread (CPU: that thread's time; wall: "
        f"also the time the thread waited for a core), those marked - are async wall times that "
        f"overlap across the concurrent calls; the last rows are PostgreSQL's own timing of one "
        f"batch's insert, foreign-key triggers apart. Then `VACUUM (ANALYZE) analytics_observations` (not timed), one "
        f"unrecorded warm-up of everything, and {size['reps']} runs of the five questions in "
        f"rotating order, ours and the peer alternating first. Ours: the wall clock of the HTTP "
        f"call as the owner's org admin (the question recorded in analytics_queries included). "
        f"The peer: the same rows through the same SQL function (`analytics_scope`) with one "
        f"psycopg `fetchall`, into numpy, then np.percentile / mean / std(ddof=1) per group and "
        f"overall, scipy.stats.ttest_ind (Welch), f_oneway + tukey_hsd, or each device's latest "
        f"category (np.lexsort) and chi2_contingency; the anova peer's time includes tukey_hsd, "
        f"as ours includes the post hoc. Floor: the same rows as binary COPY, bytes received "
        f"and nothing parsed, best of 3: no pull-based path can beat it. Max diff: relative for "
        f"statistics, means, standard deviations and percentiles, absolute for p-values "
        f"(Tukey's too); counts and contingency tables must be equal. numpy {np.__version__}, "
        f"scipy {scipy.__version__}, psycopg {psycopg.__version__}. Whole bench: {elapsed:.0f} s.",
    ])  # fmt: skip
