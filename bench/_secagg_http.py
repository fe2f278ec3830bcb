"""SecAgg+ end to end over HTTP, for bench/secagg.py: n device clients against the real server.

The server runs in this process (``_e2e_setup.stack``: ``create_app`` on a
loopback port, a throwaway PostgreSQL and S3). Per case: a model whose
version 1 is one ``Linear(999, d / 1000)`` (exactly d float32 parameters), n
registered devices, a secure round (``secure_aggregation``: t, k, clip,
quantization bits) selected and started, then n :class:`SecAggDevice`
clients through the four stages over HTTP, then ``training.aggregate`` and a
check of the published version against base + the float64 weighted mean of
the survivors. The same 2 devices drop after stage 1 (they hand in their
bundles, then never a masked vector).

Devices run as one coroutine each; at most :data:`CONCURRENCY` requests are
in flight. Between stages every device prepares its next call (Shamir shares
and sealed bundles, the masked vector) on worker threads, then all of them
call at once; a device told to wait replays its call after
:func:`poll_seconds` (±50 % jitter), as the protocol has it. Stage 2 cannot
close by itself with 2 dropouts: once every live device's vector is
accepted, the bench moves the stage deadline into the past in SQL and calls
``training.secagg.status``, which closes the stage (no stage is padded by
waiting for a real deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import random
import re
import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
from _common import envelope
from _secagg_common import CLIPPING, DROPOUTS, MAX_WEIGHT, K, T

#: (devices, parameters, how the masked vector travels): the kernel cases plus 1,000 devices,
#: inline (base64 in the JSON-RPC call); then the largest ones through uploads (presigned PUT).
CASES = (
    (10, 100_000, "inline"),
    (10, 1_000_000, "inline"),
    (50, 100_000, "inline"),
    (50, 1_000_000, "inline"),
    (1_000, 100_000, "inline"),
    (50, 1_000_000, "upload"),
    (1_000, 100_000, "upload"),
)
QUICK = ((10, 100_000, "inline"), (50, 100_000, "inline"), (10, 100_000, "upload"))
WARM_UP = (10, 100_000)  # one unreported session first
CASE_TIMEOUT = 900.0  # seconds; a case that takes longer is reported as failed
CONCURRENCY = 32  # requests in flight at once
POLL_SECONDS = 0.5  # a device told to wait replays after this long (±50 % jitter) ...
POLL_RATE = 200.0  # ... or longer, so that the cohort's replays stay under this many per second
STAGE_SECONDS = 3600  # never reached: stage 2 is closed by expiring its deadline in SQL
STAGES = ("setup", "share_keys", "masked_vectors", "unmask")
IN_FEATURES = 999  # Linear(999, m) holds 1000 m float parameters (weight and bias)
#: Server functions timed in place (skipped when absent): where the session's time goes.
PROBES = {
    "view": ("fedrpc.services.secagg_session", "view"),
    "advance": ("fedrpc.services.secagg_session", "advance"),
    "finish": ("fedrpc.services.secagg_result", "finish"),
    "recover": ("fedrpc.services.secagg_result", "recover_secrets"),
    "sum": ("fedrpc.services.secagg_result", "_unmasked_average"),
    "put": ("fedrpc.storage", "Storage.put"),
}


@dataclass
class HttpResult:
    """What one session over HTTP measured (seconds unless named otherwise)."""

    n: int
    d: int
    transport: str  # "inline" or "upload"
    k: int
    q: int
    closes: list[float]  # per stage: its first call -> the first answer showing it closed
    spans: list[float]  # per stage: its first call -> the last device knowing it closed
    work: list[float]  # per stage: wall time of preparing every device's call (worker threads)
    session: float  # first setup call -> the last device reading `completed`
    first: dict[str, list[float]]  # latency of each device's first call, per stage
    polls: dict[str, list[float]]  # latency of the replays, per stage
    packed: float  # bytes of one masked vector per masked element (d + 1)
    wire: float  # bytes of its whole JSON-RPC request body per masked element
    replayed_mb: float  # MB re-sent by stage-2 replays (polls resend the vector)
    unmask_call: float  # latency of the unmask call whose answer was the first `completed`
    probes: dict[str, tuple[float, int]]  # PROBES: seconds inside (summed), calls
    aggregate: float  # training.aggregate
    rss_mib: float  # peak RSS of this process during the case (server + simulated devices)
    rss_start_mib: float  # its RSS when the case started
    held_mib: float  # of which the devices' own stage-2 bytes (vectors and request bodies)
    error: float
    bound: float


def poll_seconds(n: int) -> float:
    """How long a device told to wait sleeps before replaying (the mean; ±50 % jitter)."""
    return max(POLL_SECONDS, n / POLL_RATE)


def linear(d: int):
    """A one-layer network with exactly d float32 parameters (d a multiple of 1000)."""
    import torch
    from torch import nn

    if d % (IN_FEATURES + 1):
        raise ValueError(f"d must be a multiple of {IN_FEATURES + 1}")
    torch.manual_seed(0)
    return nn.Linear(IN_FEATURES, d // (IN_FEATURES + 1))


def bits_for_32(n: int) -> int:
    """The most quantization bits whose sum over n full-weight devices fits 32-bit words."""
    q = 1
    while n * ((1 << (q + 1)) - 1) * int(MAX_WEIGHT) <= (1 << 32) - 1:
        q += 1
    return q


def update(seed: int, i: int, d: int) -> np.ndarray:
    """Device i's update, made on demand (N(0, 0.1^2) float32, as the kernel cases)."""
    return np.random.default_rng([seed, i]).standard_normal(d, dtype=np.float32) * np.float32(0.1)


def _rss_mib(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process in MiB; getrusage's peak off Linux (which
    also counts the image before exec, so it is not reset by clear_refs)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) / 1024


def _reset_peak_rss() -> float:
    """Start a new peak-RSS measurement (Linux: clear_refs 5 resets the high-water mark to
    the current RSS); the current RSS in MiB."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _rss_mib("VmRSS")


class Session:
    """One secure round's devices and what their calls measured."""

    def __init__(self, stack, pg_url: str, rnd: str, tokens: list[str], devices: list) -> None:
        self.stack, self.pg_url, self.rnd = stack, pg_url, rnd
        self.tokens, self.devices = tokens, devices
        self.gate = asyncio.Semaphore(CONCURRENCY)
        self.poll = poll_seconds(len(tokens))
        self.first: dict[str, list[float]] = defaultdict(list)
        self.polls: dict[str, list[float]] = defaultdict(list)
        self.closes: list[float] = []
        self.spans: list[float] = []
        self.replayed = 0
        self.closed_at: float | None = None

    async def call(self, body: bytes, token: str) -> tuple[dict, float]:
        api = self.stack.api
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        async with self.gate:
            started = time.perf_counter()
            async with api.session.post(api.url, data=body, headers=headers) as resp:
                raw = await resp.read()
            took = time.perf_counter() - started
        answer = msgspec.json.decode(raw)
        if "result" not in answer:
            raise RuntimeError(f"{body[:80]!r}... failed: {answer['error']}")
        return answer["result"], took

    def closed(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.perf_counter()

    async def stage(
        self,
        stage: str,
        bodies: dict[int, bytes],
        read: Callable[[int, dict, float], Awaitable[bool]],
        on_first: Callable[[int, dict], Awaitable[None]] | None = None,
        upload: bool = False,
    ) -> None:
        """Every device in ``bodies`` calls, then replays until its answer shows the stage closed.

        ``upload``: ``bodies`` hold masked vectors, which each device first uploads (a
        presigned PUT), then names in its call (and its replays).
        """
        self.closed_at = None
        started = time.perf_counter()

        async def device(i: int) -> None:
            replay = False
            if upload:
                bodies[i] = await self.upload(i, bodies[i])
            while True:
                result, took = await self.call(bodies[i], self.tokens[i])
                (self.polls if replay else self.first)[stage].append(took)
                self.replayed += len(bodies[i]) if replay and stage == "masked_vectors" else 0
                done = await read(i, result, took)
                if done:
                    self.closed()
                if not replay and on_first is not None:
                    await on_first(i, result)
                if done:
                    return
                replay = True
                await asyncio.sleep(self.poll * random.uniform(0.5, 1.5))

        async with asyncio.TaskGroup() as group:  # one failure cancels the other devices
            for i in bodies:
                group.create_task(device(i))
        self.closes.append(self.closed_at - started)
        self.spans.append(time.perf_counter() - started)

    async def upload(self, i: int, data: bytes) -> bytes:
        """Upload device i's masked vector; the body of its masked_vectors call naming it."""
        params = {
            "purpose": "secagg_vector",
            "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        created, took = await self.call(envelope("uploads.create", params), self.tokens[i])
        self.first["uploads.create"].append(took)
        async with self.gate:
            started = time.perf_counter()
            async with self.stack.api.session.request(
                created["method"], created["url"], data=data
            ) as resp:
                resp.raise_for_status()
            self.first["PUT (presigned)"].append(time.perf_counter() - started)
        dev = self.devices[i]
        return envelope(
            "training.secagg.masked_vectors", dev.masked_vectors_params(created["upload_id"])
        )

    async def expire_stage(self) -> None:
        """The current stage's deadline passes (as tests/methods/test_secagg.py's expire_stage)."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.pg_url, autocommit=True) as conn:
            await conn.execute(
                "UPDATE secagg_sessions SET stage_deadline = now() - interval '1 second' "
                "WHERE round_id = %s",
                (self.rnd,),
            )


async def _prepare(live: list[int], make: Callable[[int], bytes]) -> tuple[dict[int, bytes], float]:
    """Every live device's request body, built on worker threads; and the wall time it took."""
    started = time.perf_counter()
    bodies = await asyncio.gather(*(asyncio.to_thread(make, i) for i in live))
    return dict(zip(live, bodies, strict=True)), time.perf_counter() - started


async def _round(stack, n: int, d: int, seed: int) -> tuple[str, list[str], dict]:
    """A model of d parameters, n devices, a started secure round; its id, tokens, base state."""
    from _e2e_setup import DEVICE

    net = linear(d)
    await stack.register_model(net, name=f"secagg-{n}-{d}-{seed}")
    gate = asyncio.Semaphore(CONCURRENCY)

    async def register() -> None:
        async with gate:
            dev = await stack.api.ok("devices.register", DEVICE, stack.token)
            stack.devices[dev["device_id"]] = dev["token"]

    await asyncio.gather(*(register() for _ in range(n - len(stack.devices))))
    secure = {"threshold": T, "neighbours": K, "stage_seconds": STAGE_SECONDS, "clip": CLIPPING}
    params = {
        "model_id": stack.model_id,
        "base_version": 1,
        "target_device_count": n,
        "update_format": "delta",
        "max_sample_count": int(MAX_WEIGHT),
        "secure_aggregation": secure | {"quantization_bits": bits_for_32(n)},
    }
    rnd = (await stack.api.ok("training.create_round", params, stack.token))["id"]
    chosen = await stack.api.ok("training.select_devices", {"round_id": rnd}, stack.token)
    assert len(chosen["selected"]) == n, chosen
    await stack.api.ok("training.start_round", {"round_id": rnd}, stack.token)
    base = {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}
    return rnd, [stack.devices[x] for x in chosen["selected"]], base


async def run_case(
    stack, pg_url: str, n: int, d: int, seed: int, upload: bool = False
) -> HttpResult:
    """One SecAgg+ session of n devices with d parameters through the server, checked.

    ``upload``: the masked vectors go through uploads (purpose secagg_vector), not inline.
    """
    from fedrpc.client.secagg import SecAggDevice
    from fedrpc.fl.secagg import quantize

    rnd, tokens, base = await _round(stack, n, d, seed)
    rng = np.random.default_rng(seed)
    samples = [int(w) for w in rng.integers(10, int(MAX_WEIGHT), size=n)]
    dropped = {int(i) for i in rng.choice(n, size=DROPOUTS, replace=False)}
    devices = [
        SecAggDevice(np.zeros(0, np.float32), samples[i], rng=np.random.default_rng([seed, i, 1]))
        for i in range(n)
    ]
    s = Session(stack, pg_url, rnd, tokens, devices)
    everyone, alive = list(range(n)), [i for i in range(n) if i not in dropped]
    work, packed, completing = [], [], []

    async def read_setup(i: int, r: dict, _: float) -> bool:
        return devices[i].read_setup(r)

    async def read_shares(i: int, r: dict, _: float) -> bool:
        return r["status"] == "ready" and await asyncio.to_thread(devices[i].read_share_keys, r)

    async def read_masked(i: int, r: dict, _: float) -> bool:
        return devices[i].read_masked_vectors(r)

    async def read_unmask(i: int, r: dict, took: float) -> bool:
        if r["status"] == "failed":
            raise RuntimeError(f"the session failed: {r.get('failure_reason')}")
        if r["status"] == "completed" and not completing:
            completing.append(took)
        return r["status"] == "completed"

    def masked(i: int) -> bytes:
        dev = devices[i]
        dev.update = update(seed, i, d)
        packed.append(len(dev.masked_vector_bytes()))  # kept by the device: replays resend it
        dev.update = None
        if upload:
            return dev.masked_vector_bytes()  # sent at the stage's call, through an upload
        return envelope("training.secagg.masked_vectors", dev.masked_vectors_params())

    accepted: list[int] = []

    async def close_when_all_in(i: int, r: dict) -> None:
        assert r["status"] == "accepted", r
        accepted.append(i)
        if len(accepted) == len(alive):  # what the deadline would do, without the wait
            await s.expire_stage()
            status = await stack.api.ok("training.secagg.status", {"round_id": rnd}, stack.token)
            if status["stage"] != "masked_vectors":
                s.closed()

    rss_start = _reset_peak_rss()
    with _probes() as probe:
        bodies, took = await _prepare(
            everyone, lambda i: envelope("training.secagg.setup", devices[i].setup_params(rnd))
        )
        work.append(took)
        begun = time.perf_counter()  # the session starts with the first call
        await s.stage("setup", bodies, read_setup)
        bodies, took = await _prepare(
            everyone,
            lambda i: envelope("training.secagg.share_keys", devices[i].share_keys_params()),
        )
        work.append(took)
        await s.stage("share_keys", bodies, read_shares)  # the 2 dropouts take part, then stop
        bodies, took = await _prepare(alive, masked)
        work.append(took)
        held = sum(packed) + (0 if upload else sum(map(len, bodies.values())))
        await s.stage("masked_vectors", bodies, read_masked, close_when_all_in, upload)
        wire = len(bodies[alive[0]]) + (packed[0] if upload else 0)
        bodies, took = await _prepare(
            alive, lambda i: envelope("training.secagg.unmask", devices[i].unmask_params())
        )
        work.append(took)
        await s.stage("unmask", bodies, read_unmask)
        session = time.perf_counter() - begun
        probes = {name: (probe.seconds[name], probe.calls[name]) for name in probe.seconds}
    rss = _rss_mib("VmHWM")

    started = time.perf_counter()
    version = await stack.api.ok("training.aggregate", {"round_id": rnd}, stack.token)
    aggregate = time.perf_counter() - started
    assert version["num_updates"] == len(alive), version
    config = devices[alive[0]].config
    error = await _compare(stack, version["version"], config, base, seed, alive, samples)
    bound = quantize.error_bound(devices[alive[0]].spec) + 1e-6  # + float32 of base + mean
    if not error <= bound:
        raise AssertionError(f"n={n} d={d}: mean off by {error:.2e} (bound {bound:.2e})")
    return HttpResult(
        n=n,
        d=d,
        transport="upload" if upload else "inline",
        k=config["neighbours"],
        q=config["quantization_bits"],
        closes=s.closes,
        spans=s.spans,
        work=work,
        session=session,
        first=dict(s.first),
        polls=dict(s.polls),
        packed=packed[0] / (d + 1),
        wire=wire / (d + 1),
        replayed_mb=s.replayed / 1e6,
        unmask_call=completing[0],
        probes=probes,
        aggregate=aggregate,
        rss_mib=rss,
        rss_start_mib=rss_start,
        held_mib=held / 2**20,
        error=error,
        bound=bound,
    )


@contextlib.contextmanager
def _probes():
    from _e2e_setup import Probe

    with Probe() as probe:
        for name, (module, path) in PROBES.items():
            owner, attr = importlib.import_module(module), path
            while "." in attr and owner is not None:
                head, attr = attr.split(".", 1)
                owner = getattr(owner, head, None)
            if owner is not None and hasattr(owner, attr):
                probe.wrap(owner, attr, name)
        yield probe


async def _compare(stack, version: int, config: dict, base: dict, seed: int, alive, samples):
    """Max abs difference between the published version and base + the float64 weighted mean
    of the survivors' updates (made again here, in the session's tensor order)."""
    import safetensors.numpy

    links = await stack.api.ok(
        "models.versions.download", {"model_id": stack.model_id, "version": version}, stack.token
    )
    url = next(a["url"] for a in links["artifacts"] if a["kind"] == "safetensors")
    async with stack.api.session.get(url) as resp:
        stored = safetensors.numpy.load(await resp.read())
    d = config["dimension"]
    total, weight = np.zeros(d), 0
    for i in alive:
        w = min(samples[i], config["max_weight"])
        total += w * update(seed, i, d).astype(np.float64)
        weight += w
    mean, error, at = total / weight, 0.0, 0
    for t in config["tensors"]:
        size = int(np.prod(t["shape"]))
        want = base[t["name"]].reshape(-1) + mean[at : at + size]
        got = stored[t["name"]].astype(np.float64).reshape(-1)
        error = max(error, float(np.max(np.abs(got - want))))
        at += size
    assert at == d, (at, d)
    return error


def bench_http(cases=CASES, seed: int = 7000) -> tuple[list[HttpResult], list[str]]:
    """Every case, one after another, on one set of throwaway services and one server,
    after one unreported warm-up session; the results, and one line per case that failed."""
    from _e2e_setup import services, stack

    results: list[HttpResult] = []
    failures: list[str] = []

    async def run(pg_url: str, s3) -> None:
        async with stack(pg_url, s3) as st:
            await run_case(st, pg_url, *WARM_UP, seed - 1)  # imports, connections, first puts
            for i, (n, d, transport) in enumerate(cases):
                try:
                    async with asyncio.timeout(CASE_TIMEOUT):
                        r = await run_case(st, pg_url, n, d, seed + 100 * i, transport == "upload")
                except Exception as exc:  # noqa: BLE001 - reported in the output, next case runs
                    while isinstance(exc, ExceptionGroup):  # from the devices' task group
                        exc = exc.exceptions[0]
                    failures.append(f"n={n:,}, d={d / 1e6:g}M, {transport}: failed: {exc!r}")
                    print(failures[-1], flush=True)
                    continue
                results.append(r)
                print(_line(r), flush=True)

    with services() as (pg_url, s3):
        asyncio.run(run(pg_url, s3))
    return results, failures


def pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def secs(seconds: float) -> str:
    return (
        f"{seconds:.3f}" if seconds < 1 else f"{seconds:.2f}" if seconds < 10 else f"{seconds:.1f}"
    )


def millis(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def label(r: HttpResult) -> str:
    return f"n={r.n:,}, d={r.d / 1e6:g}M, k={r.k}, q={r.q}, {r.transport}"


def _line(r: HttpResult) -> str:
    return (
        f"http {label(r)}: stages closed {' '.join(secs(c) for c in r.closes)} s, session "
        f"{secs(r.session)} s, unmask call {secs(r.unmask_call)} s, aggregate {secs(r.aggregate)} s, "
        f"{r.wire:.3f} B/param on the wire, rss {r.rss_mib:.0f} MiB, err {r.error:.1e}; "
        + ", ".join(f"{k} {secs(v)} s / {c}" for k, (v, c) in r.probes.items())
    )
