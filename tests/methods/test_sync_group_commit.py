"""devices.sync under concurrency: heartbeats sharing one statement each keep their own answer.

The HTTP tests send concurrent heartbeats the way devices do; the ``Database.coalesced``
tests gather calls in one event-loop turn, which is what puts them in one batch for certain.
Expected values are the ones each test sends, read back through ``devices.get``.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

import methods.devices
from fedrpc.app import SERVICES
from fedrpc.auth import Principal
from fedrpc.context import Context
from fedrpc.db import Database
from fedrpc.errors import BadRequest
from methods.devices import Heartbeat
from schemas.devices import SyncParams, SyncResult
from tests.conftest import DEVICE_DEFAULTS, register_device

QUERY = "devices.update_device_states"
FIELDS = ("battery_pct", "charging", "network_type", "available_storage_mb", "app_version")


def heartbeat(device_id: str, **values) -> dict:
    """The parameters devices.sync passes for one call: unreported fields are None."""
    return {"device_id": device_id, **dict.fromkeys(FIELDS), "state": None, **values}


async def beat(db: Database, device_id: str, **values) -> Heartbeat | None:
    return await db.coalesced(QUERY, Heartbeat, key="device_id", **heartbeat(device_id, **values))


async def stored(client, org, device_id: str) -> dict:
    return await client.ok("devices.get", {"device_id": device_id}, org.token)


@pytest.fixture
async def fleet(client, org) -> list[dict]:
    return [await register_device(client, org.token) for _ in range(6)]


@pytest.fixture
def statements(monkeypatch) -> list[str]:
    """The names of the statements Database.all runs during the test."""
    seen: list[str] = []
    original = Database.all

    def counting(self, name, *args, **kwargs):
        seen.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(Database, "all", counting)
    return seen


# over HTTP


async def test_concurrent_syncs_each_get_their_own_answer_and_keep_their_own_values(
    client, org, fleet
):
    reports = [
        {"battery_pct": 10 + i, "charging": i % 2 == 0, "state": {"i": i}}
        for i in range(len(fleet))
    ]
    results = await asyncio.gather(
        *(client.ok("devices.sync", r, d["token"]) for d, r in zip(fleet, reports, strict=True))
    )
    for device, report, result in zip(fleet, reports, results, strict=True):
        assert result["device_id"] == device["device_id"]
        record = await stored(client, org, device["device_id"])
        assert {k: record[k] for k in report} == report
        assert record["last_seen_at"] == result["server_time"]


async def test_concurrent_syncs_of_one_device_all_succeed(client, org, fleet):
    device = fleet[0]
    results = await asyncio.gather(
        *(client.ok("devices.sync", {"battery_pct": 50}, device["token"]) for _ in range(5))
    )
    assert {r["device_id"] for r in results} == {device["device_id"]}
    assert (await stored(client, org, device["device_id"]))["battery_pct"] == 50


async def test_a_nul_character_the_database_cannot_store_is_a_bad_request(client, org, fleet):
    device = fleet[0]
    for params in ({"app_version": "1.0\u0000"}, {"state": {"k": "a\u0000b"}}):
        error = await client.error("devices.sync", params, device["token"])
        assert error["code"] == 4400 and error["data"]["type"] == "bad_request", error
    record = await stored(client, org, device["device_id"])
    assert record["app_version"] == DEVICE_DEFAULTS["app_version"] and record["state"] == {}


# Database.coalesced: calls gathered in one loop turn


async def test_calls_in_one_loop_turn_share_one_statement_and_get_their_own_rows(
    client, org, fleet, statements
):
    db = client.app[SERVICES].db
    ids = [d["device_id"] for d in fleet]
    rows = await asyncio.gather(*(beat(db, i, battery_pct=n) for n, i in enumerate(ids)))
    assert statements == [QUERY]
    assert [row.device_id for row in rows] == ids
    assert len({row.last_seen_at for row in rows}) == 1  # one statement, one now()
    for n, device_id in enumerate(ids):
        assert (await stored(client, org, device_id))["battery_pct"] == n


async def test_a_revoked_device_in_a_batch_gets_no_row_and_the_others_do(
    client, org, fleet, database_url, statements
):
    db = client.app[SERVICES].db
    ids = [d["device_id"] for d in fleet]
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("UPDATE devices SET revoked_at = now() WHERE id = %s", (ids[2],))
    rows = await asyncio.gather(*(beat(db, i, battery_pct=7) for i in ids))
    assert statements == [QUERY]
    assert rows[2] is None
    assert [row.device_id for row in rows if row is not None] == ids[:2] + ids[3:]
    assert (await stored(client, org, ids[2]))["battery_pct"] == 80
    assert (await stored(client, org, ids[3]))["battery_pct"] == 7


async def test_a_call_the_database_refuses_fails_alone(client, org, fleet, statements):
    db = client.app[SERVICES].db
    ids = [d["device_id"] for d in fleet]
    levels = list(range(len(ids)))
    levels[1] = 101  # the column's CHECK refuses it
    outcomes = await asyncio.gather(
        *(beat(db, i, battery_pct=v) for i, v in zip(ids, levels, strict=True)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], BadRequest)
    assert [o.device_id for n, o in enumerate(outcomes) if n != 1] == ids[:1] + ids[2:]
    # The batch failed as a whole, then every call ran alone.
    assert statements == [QUERY] * (1 + len(ids))
    for n, device_id in enumerate(ids):
        want = DEVICE_DEFAULTS["capabilities"]["battery_pct"] if n == 1 else levels[n]
        assert (await stored(client, org, device_id))["battery_pct"] == want


async def test_one_device_twice_in_a_turn_keeps_the_later_reported_values(client, org, fleet):
    db = client.app[SERVICES].db
    device_id = fleet[0]["device_id"]
    first, second = await asyncio.gather(
        beat(db, device_id, battery_pct=10, network_type="cellular", state=None),
        beat(db, device_id, battery_pct=20, charging=False),
    )
    assert first == second and first.device_id == device_id
    record = await stored(client, org, device_id)
    assert (record["battery_pct"], record["charging"], record["network_type"]) == (
        20,
        False,
        "cellular",
    )


async def test_inside_a_transaction_a_call_runs_alone_on_its_connection(client, org, fleet):
    db = client.app[SERVICES].db
    device_id = fleet[0]["device_id"]
    with pytest.raises(RuntimeError, match="roll back"):
        async with db.transaction() as tx:
            row = await beat(tx, device_id, battery_pct=1)
            assert row is not None and row.device_id == device_id
            raise RuntimeError("roll back")
    assert (await stored(client, org, device_id))["battery_pct"] == 80


async def test_a_cancelled_caller_does_not_stop_the_others(client, org, fleet):
    db = client.app[SERVICES].db
    ids = [d["device_id"] for d in fleet[:3]]
    tasks = [asyncio.ensure_future(beat(db, i, battery_pct=33)) for i in ids]
    await asyncio.sleep(0)  # every call is queued for the batch
    tasks[0].cancel()
    rest = await asyncio.gather(*tasks[1:])
    assert [row.device_id for row in rest] == ids[1:]
    assert tasks[0].cancelled()
    assert (await stored(client, org, ids[2]))["battery_pct"] == 33


async def test_offers_and_stop_instructions_reach_only_the_selected_device(client, org, mlp_model):
    selected = await register_device(client, org.token)
    idle = await register_device(client, org.token, platform="ios")
    rnd = await client.ok(
        "training.create_round",
        {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 1},
        org.token,
    )
    criteria = {"round_id": rnd["id"], "criteria": {"platform": "android"}}
    await client.ok("training.select_devices", criteria, org.token)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    services = client.app[SERVICES]

    async def sync(device: dict, **report) -> SyncResult:
        principal = Principal("device", org.id, device_id=device["device_id"])
        return await methods.devices.sync(Context(services, principal, "req"), SyncParams(**report))

    # The selected device twice (merged into one row) and the idle one, in one statement.
    first, second, other = await asyncio.gather(
        sync(selected, battery_pct=60), sync(selected), sync(idle, battery_pct=5)
    )
    for answer in (first, second):
        assert [o.round_id for o in answer.desired_state.round_offers] == [rnd["id"]]
        assert answer.desired_state.round_offers[0].weights_url.startswith("http")
    assert other.desired_state.round_offers == [] and other.device_id == idle["device_id"]

    await client.ok("training.cancel_round", {"round_id": rnd["id"], "reason": "r"}, org.token)
    mine, theirs = await asyncio.gather(sync(selected), sync(idle))
    assert [s.round_id for s in mine.desired_state.stop_rounds] == [rnd["id"]]
    assert mine.desired_state.round_offers == [] and theirs.desired_state.stop_rounds == []
