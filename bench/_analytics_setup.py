"""Set-up for the analytics bench: a federation, its devices and groups, and the reports.

Everything here goes through the server's own JSON-RPC methods over HTTP
except the two organizations (``fedrpc.admin.create_org``, as an operator
makes them). The observations are generated up front and encoded into
request bodies before the ingest clock starts, so the clock measures the
server (and the loopback), not the bench building JSON.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
from _common import envelope  # bench/ is on sys.path (analytics.py is run from it)

GROUPS = 50
BATCH = 10_000  # the server's default FEDRPC_ANALYTICS_MAX_OBSERVATIONS: one call's ceiling
INGEST_CONCURRENCY = 8  # devices reporting at once
MEMBER_DEVICES = 100  # every category of a and b held by >= 10 of them (the floor)
MEMBER_VALUES = 100  # numeric observations per member device (outside every device group)
CATEGORIES_1, CATEGORIES_2 = 3, 4
DEVICE = {
    "platform": "android", "os_version": "14", "model": "bench", "app_version": "1.0",
    "capabilities": {"battery_pct": 90, "charging": True, "network_type": "wifi",
                     "available_storage_mb": 4096},
}  # fmt: skip


class _Obs(msgspec.Struct, omit_defaults=True):
    variable: str
    recorded_at: str
    value: float | None = None
    category: str | None = None


@dataclass
class Org:
    id: str
    token: str


@dataclass
class Device:
    id: str
    token: str
    group: int  # index into Fleet.groups; -1 for the member organization's devices


@dataclass
class Fleet:
    """The federation the questions are asked of, and who reports into it."""

    owner: Org
    member: Org
    federation_id: str
    groups: list[str]  # the owner's device group ids, group 0..GROUPS-1
    devices: list[Device] = field(default_factory=list)


async def _call(session: Any, url: str, method: str, params: dict, token: str) -> Any:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    async with session.post(url, data=envelope(method, params), headers=headers) as resp:
        answer = msgspec.json.decode(await resp.read())
    if "result" not in answer:
        raise SystemExit(f"{method} failed: {answer['error']}")
    return answer["result"]


async def build(stack: Any, devices_per_group: int) -> Fleet:
    """Owner and member organizations, the federation, devices, and the owner's 50 groups.

    Every owner device is in exactly one of the owner's device groups before
    it reports (the server attaches a device's groups when it stores a row).
    """
    from fedrpc.admin import create_org

    db, session, url = stack.services.db, stack.api.session, stack.api.url
    orgs = [await create_org(db, name) for name in ("owner", "member")]
    owner, member = (Org(org.id, token) for org, token in orgs)
    fed = await _call(
        session,
        url,
        "federations.create",
        {"name": "analytics-bench", "org_id": owner.id, "analytics_policy": {"min_group_size": 10}},
        owner.token,
    )
    await _call(session, url, "federations.invite", {"federation_id": fed["id"], "org_ids": [member.id]}, owner.token)  # fmt: skip
    await _call(session, url, "federations.join", {"federation_id": fed["id"], "org_id": member.id}, member.token)  # fmt: skip
    gate = asyncio.Semaphore(INGEST_CONCURRENCY)

    async def register(org: Org, group: int) -> Device:
        async with gate:
            d = await _call(session, url, "devices.register", DEVICE, org.token)
        return Device(d["device_id"], d["token"], group)

    jobs = [register(owner, g) for g in range(GROUPS) for _ in range(devices_per_group)]
    jobs += [register(member, -1) for _ in range(MEMBER_DEVICES)]
    devices = list(await asyncio.gather(*jobs))
    groups = []
    for g in range(GROUPS):
        group = await _call(
            session, url, "devices.groups.create", {"name": f"g{g:02d}"}, owner.token
        )
        ids = [d.id for d in devices if d.group == g]
        params = {"group_id": group["id"], "device_ids": ids}
        await _call(session, url, "devices.groups.add_devices", params, owner.token)
        groups.append(group["id"])
    return Fleet(owner, member, fed["id"], groups, devices)


@dataclass
class Reports:
    """The request bodies of every analytics.report call, and what they carry."""

    calls: list[tuple[str, bytes, int]]  # (device token, body, observations)
    numeric: int
    categorical: int

    @property
    def observations(self) -> int:
        return self.numeric + self.categorical

    def summary(self) -> dict[str, int]:
        """What the bodies carry, without them."""
        return {
            "observations": self.numeric + self.categorical,
            "numeric": self.numeric,
            "categorical": self.categorical,
            "calls": len(self.calls),
            "bytes": sum(len(b) for _, b, _ in self.calls),
        }


def _times(rng: np.random.Generator, now: np.datetime64, n: int) -> list[str]:
    """n distinct-ish ISO instants within the last day, in increasing order."""
    ms = np.sort(rng.integers(60_000, 86_400_000, n))[::-1]
    return np.datetime_as_string(
        now - ms.astype("timedelta64[ms]"), unit="ms", timezone="UTC"
    ).tolist()


def group_mean(g: int) -> float:
    return 10.0 + 0.02 * g


def reports(fleet: Fleet, numeric: int, history: int, seed: int = 12) -> Reports:
    """Bodies for ``numeric`` observations of ``x`` spread over the owner's devices (group g:
    N(10 + 0.02 g, (1.5 + 0.01 g)^2)), MEMBER_VALUES of ``x`` per member device, and per device
    a history of ``history`` categories of ``a`` and of ``b`` (the latest counts; its a
    leans on its group). Each device sends its rows in as few calls as BATCH allows."""
    rng = np.random.default_rng(seed)
    now = np.datetime64("now", "ms")
    owners = [d for d in fleet.devices if d.group >= 0]
    per_device = np.diff(np.linspace(0, numeric, len(owners) + 1).astype(int))
    calls: list[tuple[str, bytes, int]] = []
    categorical = 0
    for device in fleet.devices:
        g = device.group
        n = int(per_device[owners.index(device)]) if g >= 0 else MEMBER_VALUES
        mean, sd = (group_mean(g), 1.5 + 0.01 * g) if g >= 0 else (10.0, 1.5)
        values = rng.normal(mean, sd, n).tolist()
        rows = [_Obs("x", t, value=v) for v, t in zip(values, _times(rng, now, n), strict=True)]
        lean = np.full(CATEGORIES_1, 1.0)
        lean[max(g, 0) % CATEGORIES_1] += 1.0
        a = rng.choice(CATEGORIES_1, history, p=lean / lean.sum())
        b = rng.integers(0, CATEGORIES_2, history)
        when = _times(rng, now, 2 * history)
        rows += [_Obs("a", t, category=f"a{c}") for c, t in zip(a, when[::2], strict=True)]
        rows += [_Obs("b", t, category=f"b{c}") for c, t in zip(b, when[1::2], strict=True)]
        categorical += 2 * history
        for i in range(0, len(rows), BATCH):
            chunk = rows[i : i + BATCH]
            calls.append((device.token, envelope("analytics.report", {"observations": chunk}), len(chunk)))  # fmt: skip
    numeric_total = sum(n for _, _, n in calls) - categorical
    return Reports(calls, numeric_total, categorical)


async def ingest(stack: Any, batch: list[tuple[str, bytes, int]], concurrency: int) -> float:
    """Post every body, ``concurrency`` at a time; wall seconds from the first to the last answer."""
    session, url = stack.api.session, stack.api.url
    queue = list(reversed(batch))
    failures: list[bytes] = []

    async def worker() -> None:
        while queue:
            token, body, n = queue.pop()
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.read()
            if answer.find(b'"accepted":%d' % n) < 0:
                failures.append(answer[:300])

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"analytics.report failed: {failures[0]!r}")
    return elapsed
