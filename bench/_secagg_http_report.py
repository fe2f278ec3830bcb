"""The tables and notes of bench/secagg.py's end-to-end HTTP part (bench/_secagg_http.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from _report import table
from _secagg_common import CLIPPING, DROPOUTS, MAX_WEIGHT, K, T
from _secagg_http import (
    CONCURRENCY,
    IN_FEATURES,
    POLL_RATE,
    POLL_SECONDS,
    PROBES,
    STAGE_SECONDS,
    STAGES,
    HttpResult,
    label,
    millis,
    pct,
    secs,
)

__all__ = ["report"]


HEAD = [
    "case (t=6, 2 dropped after stage 1)",
    *(f"stage {i} {name}: closed (all know) s" for i, name in enumerate(STAGES)),
    "session s (devices' own work)",
    "unmask call s (server's unmask work)",
    "training.aggregate s",
    "bytes / masked param: packed, on the wire",
    "stage-2 replays MB",
    "max abs error (bound)",
    "peak RSS MiB (rise in the case; devices' stage-2 bytes)",
]
LATENCY_HEAD = [
    "case", "call", "first calls", "p50 ms", "p99 ms", "replays", "replay p50 ms", "replay p99 ms"
]  # fmt: skip


def rows(results: list[HttpResult]) -> list[list[object]]:
    out = []
    for r in results:
        finish = r.probes.get("finish")
        work = "" if finish is None else f" ({secs(finish[0])})"
        out.append([
            label(r),
            *(f"{secs(c)} ({secs(a)})" for c, a in zip(r.closes, r.spans, strict=True)),
            f"{secs(r.session)} ({secs(sum(r.work[1:]))})",
            f"{secs(r.unmask_call)}{work}",
            secs(r.aggregate),
            f"{r.packed:.3f}, **{r.wire:.3f}**",
            f"{r.replayed_mb:.0f}",
            f"{r.error:.1e} ({r.bound:.1e})",
            f"{r.rss_mib:.0f} (+{r.rss_mib - r.rss_start_mib:.0f}; {r.held_mib:.0f})",
        ])  # fmt: skip
    return out


def latency_rows(results: list[HttpResult]) -> list[list[object]]:
    out = []
    for r in results:
        calls = [f"training.secagg.{s}" for s in STAGES]
        calls[2:2] = [c for c in r.first if c not in STAGES]  # an upload's calls, before stage 2
        for call in calls:
            key = call.removeprefix("training.secagg.")
            first, polls = r.first.get(key, []), r.polls.get(key, [])
            out.append([
                label(r), call,
                len(first), millis(pct(first, 50)), millis(pct(first, 99)),
                len(polls), millis(pct(polls, 50)) if polls else "", millis(pct(polls, 99)) if polls else "",
            ])  # fmt: skip
    return out


def _probe_names(results: list[HttpResult]) -> list[str]:
    return [name for name in PROBES if any(name in r.probes for r in results)]


def probe_rows(results: list[HttpResult]) -> list[list[object]]:
    def cell(r: HttpResult, name: str) -> str:
        seconds, calls = r.probes.get(name, (0.0, 0))
        return f"{secs(seconds)} ({calls:,})"

    return [[label(r), *(cell(r, name) for name in _probe_names(results))] for r in results]


def report(results: list[HttpResult], failures: list[str], elapsed: float) -> str:
    """The end-to-end tables and their notes (markdown)."""
    probe_head = ["case", *(f"`{PROBES[n][1]}` s (calls)" for n in _probe_names(results))]
    parts = [
        "**Ours end to end over HTTP** (the `training.secagg.*` methods, one session per "
        f"case; run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC):",
        table(HEAD, rows(results)),
        *(f"**{line}**" for line in failures),
        table(LATENCY_HEAD, latency_rows(results)),
        "Where the server's time goes (wall time inside these functions, summed over calls):",
        table(probe_head, probe_rows(results)),
        _notes(elapsed),
    ]
    return "\n\n".join(parts)


def _notes(elapsed: float) -> str:
    return (
        "`python bench/secagg.py --http-only` (this part alone; `--quick` for three small "
        "cases, written nowhere). The server runs in the bench's process (create_app on a "
        "loopback port, rate limits off) on a throwaway PostgreSQL (pgserver) and S3 (weed "
        "mini), on the same 2 cores as the simulated devices; one unreported warm-up session "
        "comes first, then one session per case. Per case: a model whose version 1 is one "
        f"Linear({IN_FEATURES}, d/1000) (exactly d float32 parameters), n devices, a secure "
        f"round (t = {T}, neighbours = {K}, which the server caps at n - 1, clip "
        f"{CLIPPING:g}, the most quantization bits q that keep 32-bit words at maximum weight "
        f"{MAX_WEIGHT:g}, stage_seconds {STAGE_SECONDS}), selected and started; then n "
        "`fedrpc.client.secagg.SecAggDevice`s through the four stages over HTTP, "
        "training.aggregate, and the published version checked against base + the float64 "
        "weighted mean of the survivors (max abs error; bound: one quantization step plus "
        "float32 storage). Devices are coroutines with at most "
        f"{CONCURRENCY} requests in flight; before each stage every device builds its call "
        "on worker threads (its own work: in brackets under 'session', stages 1-3), then all "
        "call at once; a device told to wait replays the same call after "
        f"max({POLL_SECONDS:g} s, n / {POLL_RATE:g} per s) ±50 % (so the cohort's replays "
        f"stay near {POLL_RATE:g} per second: 5 s at 1,000 devices). The same {DROPOUTS} "
        "devices drop after stage 1, so stage 2 would close only at its deadline: once every "
        "live vector is accepted the bench sets the deadline into the past in SQL (as "
        "tests/methods/test_secagg.py does) and calls training.secagg.status, which closes "
        "the stage; no stage waits for a real deadline. Inline: the masked vector is base64 "
        "inside the JSON-RPC call; upload: the device first calls uploads.create (purpose "
        "secagg_vector) and PUTs the raw bytes to the presigned URL, then names the upload "
        "(both counted in stage 2). Stage times: from the stage's first call to the first "
        "answer showing it closed, in brackets to the last device reading that (the replays' "
        "poll lag on top). Session: first setup call to the last device reading "
        "`completed`. Unmask call: the latency of the unmask call whose answer was the first "
        "`completed` (it waits its turn for the session lock, then the server reconstructs, "
        "sums the vectors from S3, unmasks and stores: that work in brackets). Bytes on the "
        "wire: the JSON-RPC request carrying the vector (base64: 4/3 of packed), or the PUT "
        "plus the call naming the upload; divided by d + 1. Stage-2 replays: bytes re-sent "
        "by devices polling stage 2 inline (a replay carries the whole vector again; one "
        "naming an upload does not). Latencies: per HTTP call as a device sees it, queueing "
        "for the session lock included. Server functions: every stage call runs them under "
        "the session's row lock, so their sums are time the session spent in them (the event "
        "loop serves other requests meanwhile, which is counted too); `advance` calls `view` "
        "and `finish`, `finish` calls `recover_secrets` and `_unmasked_average` (on worker "
        "threads). Peak RSS: this process (server, event loop and every simulated device; "
        "its baseline holds torch, imported to build the models), reset per case; in "
        "brackets how much it rose above the RSS at the case's start, and the stage-2 bytes "
        "the simulated devices held (their packed vectors and request bodies). One session per case: single runs on shared "
        f"cores, noisy. Whole HTTP part: {elapsed:.0f} s."
    )
