"""Aggregation claims (issue 14): leases that are renewed, a fixed set of updates, cancelling
mid-aggregation, and server optimiser state kept per lineage.

An aggregation is held at its publish step by a row lock this test takes on the model from
its own connection (publishing a version locks the model row to number it): a real lock in
the real database, so the server runs unchanged while the test acts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import numpy as np
import psycopg
import pytest
import safetensors.numpy
from minio import Minio

from fedrpc.admin import create_org
from fedrpc.app import SERVICES, create_app
from fedrpc.services.rounds import Claim, ClaimLost
from fedrpc.tasks import aggregate_due_rounds
from tests.conftest import OrgHandle, RpcClient, register_device
from tests.kernels.test_strategies_fedopt import reference_adaptive
from tests.methods.conftest import b64, inline
from tests.methods.test_aggregate import base_state, client_state, download, run_round


@pytest.fixture
def lease_settings(settings):
    # A short lease (renewed every 0.4 s), and no background pass after the first: the tests
    # run the auto-aggregation job themselves.
    return msgspec.structs.replace(
        settings, aggregation_lease_seconds=1.2, background_interval_seconds=3600.0
    )


@pytest.fixture
async def lease_client(aiohttp_client, lease_settings) -> RpcClient:
    return RpcClient(await aiohttp_client(create_app(lease_settings)))


@pytest.fixture
async def model(lease_client, mlp_bundle):
    # The org is made through this app (the shared `make_org` would start a second app).
    made, token = await create_org(lease_client.app[SERVICES].db, "lease-org")
    org = OrgHandle(made.id, token)
    created = await lease_client.ok("models.create", {"name": "mlp"}, org.token)
    await lease_client.ok(
        "models.versions.create", {"model_id": created["id"], **inline(mlp_bundle[1])}, org.token
    )
    return org, created


@contextlib.asynccontextmanager
async def model_locked(database_url: str, model_id: str) -> AsyncIterator[None]:
    """Hold the model's row lock: an aggregation that reaches its publish step waits on it."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute("SELECT id FROM models WHERE id = %s FOR UPDATE", (model_id,))
        try:
            yield
        finally:
            await conn.rollback()


async def wait_for_lock(database_url: str, query_like: str) -> None:
    """Until a server connection running a statement LIKE ``query_like`` waits on a lock."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for _ in range(500):
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE %s",
                (query_like,),
            )
            if (await cur.fetchone())[0]:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"no statement like {query_like!r} waited on a lock")


async def wait_for_publish_step(database_url: str) -> None:
    """Until the aggregation waits on the model's row lock (it has written its objects and
    is about to store its version)."""
    await wait_for_lock(database_url, "%FROM models WHERE id%")


async def lease_row(database_url: str, round_id: str) -> tuple:
    """(state, claim token, seconds of lease left by the database clock)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT state, aggregation_claim,"
            " extract(epoch FROM aggregation_lease_until - clock_timestamp())::float8"
            " FROM training_rounds WHERE id = %s",
            (round_id,),
        )
        return await cur.fetchone()


def object_keys(settings, model_id: str) -> list[str]:
    s3 = Minio(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, secure=False)
    objects = s3.list_objects(settings.s3_bucket, prefix=f"models/{model_id}/", recursive=True)
    return sorted(o.object_name for o in objects)


async def test_a_second_claim_succeeds_only_after_the_lease_truly_expired(
    lease_client, model, mlp_bundle, database_url
):
    org, mdl = model
    rnd, _, _ = await run_round(lease_client, org, mdl, mlp_bundle[0], n=2)
    # A worker claims the round through the server's own code, then vanishes (never renews).
    vanished = Claim(lease_client.app[SERVICES].db, rnd["id"], lease_seconds=2.5)
    await vanished.take()

    refused = await lease_client.error("training.aggregate", {"round_id": rnd["id"]}, org.token)
    state, token, left = await lease_row(database_url, rnd["id"])
    assert refused["data"]["type"] == "conflict" and refused["data"]["state"] == "aggregating"
    assert state == "aggregating" and token == vanished.token and left > 0  # refused in time

    await asyncio.sleep(left + 0.05)
    async with model_locked(database_url, mdl["id"]):
        second = asyncio.create_task(
            lease_client.call("training.aggregate", {"round_id": rnd["id"]}, org.token)
        )
        await wait_for_publish_step(database_url)
        # The round is the second aggregation's now: the first one's guarded updates touch no row.
        with pytest.raises(ClaimLost) as lost:
            await vanished.renew()
        assert lost.value.details["state"] == "aggregating"
        with pytest.raises(ClaimLost):
            await vanished.fail("too late")
        await vanished.release()
        state, token, _ = await lease_row(database_url, rnd["id"])
        assert state == "aggregating" and token not in (None, vanished.token)
    answer = await second
    assert answer["result"]["version"] == 2 and answer["result"]["num_updates"] == 2, answer
    done = await lease_client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert done["state"] == "completed" and done["result_version"] == 2


async def test_the_job_takes_over_only_a_round_whose_lease_ran_out(
    lease_client, model, mlp_bundle, database_url
):
    org, mdl = model
    extra = {"auto_aggregate": True}
    rnd, _, _ = await run_round(lease_client, org, mdl, mlp_bundle[0], n=2, extra=extra)
    services = lease_client.app[SERVICES]
    worker = Claim(services.db, rnd["id"], lease_seconds=1.0)
    await worker.take()
    async with worker.renewed():
        # Started an hour ago and still renewed: alive, whatever its age.
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(
                "UPDATE training_rounds SET aggregation_started_at = now() - interval '1 hour'"
                " WHERE id = %s",
                (rnd["id"],),
            )
        await asyncio.sleep(1.3)  # past the first lease: renewals keep it
        await aggregate_due_rounds(services)
        state, token, _ = await lease_row(database_url, rnd["id"])
        assert (state, token) == ("aggregating", worker.token)
    # The worker stops renewing (it vanished); once its lease ran out the job takes over.
    *_, left = await lease_row(database_url, rnd["id"])
    await asyncio.sleep(left + 0.05)
    await aggregate_due_rounds(services)
    done = await lease_client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert done["state"] == "completed" and done["result_version"] == 2


async def started_round(client, org, mdl, n: int, **extra) -> tuple[dict, list[str]]:
    """A running delta round of the org's n devices (its only ones: all are selected)."""
    tokens = [(await register_device(client, org.token))["token"] for _ in range(n)]
    params = {
        "model_id": mdl["id"],
        "base_version": 1,
        "target_device_count": n,
        "min_updates": 1,
        "update_format": "delta",
        **extra,
    }
    rnd = await client.ok("training.create_round", params, org.token)
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    return rnd, tokens


async def upload(client, rnd: dict, token: str, base: dict, seed: int) -> dict:
    """One device's delta upload; the whole JSON-RPC response."""
    params = {
        "round_id": rnd["id"],
        "model_id": rnd["model_id"],
        "version": rnd["base_version"],
        "sample_count": 10,
        "update_format": "delta",
        "weights": {"data": b64(safetensors.numpy.save(client_state(base, seed, "delta")))},
    }
    return await client.call("training.weights.upload", params, token, id_=seed)


async def test_renewal_keeps_a_slow_aggregation_owned_and_later_uploads_out(
    lease_client, model, mlp_bundle, database_url
):
    org, mdl = model
    base = base_state(mlp_bundle[0])
    rnd, tokens = await started_round(lease_client, org, mdl, 3)
    for i, token in enumerate(tokens[:2]):
        assert "result" in await upload(lease_client, rnd, token, base, seed=i)
    async with model_locked(database_url, mdl["id"]):
        first = asyncio.create_task(
            lease_client.call("training.aggregate", {"round_id": rnd["id"]}, org.token)
        )
        await wait_for_publish_step(database_url)
        _, token, _ = await lease_row(database_url, rnd["id"])
        # Held for three times its 1.2 s lease: every other claim is refused meanwhile.
        for _ in range(6):
            await asyncio.sleep(0.6)
            # (A claim that wrongly succeeded would wait on the test's lock: bounded.)
            refused = await asyncio.wait_for(
                lease_client.error("training.aggregate", {"round_id": rnd["id"]}, org.token), 5
            )
            assert refused["data"]["type"] == "conflict", refused
            state, held_by, left = await lease_row(database_url, rnd["id"])
            assert (state, held_by) == ("aggregating", token) and left > 0
        # The claim fixed the round's updates: one arriving now is refused, not dropped.
        late = await upload(lease_client, rnd, tokens[2], base, seed=2)
        assert late["error"]["data"]["type"] == "precondition_failed"
        assert late["error"]["data"]["state"] == "aggregating"
    answer = await first
    assert answer["result"]["version"] == 2 and answer["result"]["num_updates"] == 2, answer
    versions = await lease_client.ok("models.versions.list", {"model_id": mdl["id"]}, org.token)
    assert versions["total"] == 2


async def test_cancelling_mid_aggregation_publishes_nothing_and_deletes_its_objects(
    lease_client, model, mlp_bundle, database_url, lease_settings
):
    org, mdl = model
    base = base_state(mlp_bundle[0])
    # FedAvgM also writes a server optimiser state object.
    strategy = {"name": "fedavgm", "params": {"server_momentum": 0.9}}
    rnd, tokens = await started_round(lease_client, org, mdl, 2, strategy=strategy)
    for i, token in enumerate(tokens):
        assert "result" in await upload(lease_client, rnd, token, base, seed=i)
    before = object_keys(lease_settings, mdl["id"])
    async with model_locked(database_url, mdl["id"]):
        aggregation = asyncio.create_task(
            lease_client.call("training.aggregate", {"round_id": rnd["id"]}, org.token)
        )
        await wait_for_publish_step(database_url)
        written = set(object_keys(lease_settings, mdl["id"])) - set(before)
        assert any("/server-state/" in k for k in written) and len(written) >= 5, written
        cancelled = await lease_client.ok(
            "training.cancel_round", {"round_id": rnd["id"], "reason": "wrong data"}, org.token
        )
        assert cancelled["state"] == "cancelled"
    answer = await aggregation
    assert answer["error"]["data"]["type"] == "conflict", answer
    assert answer["error"]["data"]["state"] == "cancelled"
    shown = await lease_client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert shown["state"] == "cancelled" and shown["cancel_reason"] == "wrong data"
    assert shown["result_version"] is None
    versions = await lease_client.ok("models.versions.list", {"model_id": mdl["id"]}, org.token)
    assert versions["total"] == 1
    assert object_keys(lease_settings, mdl["id"]) == before
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM model_server_state WHERE model_id = %s", (mdl["id"],)
        )
        assert (await cur.fetchone())[0] == 0


async def test_uploads_committed_while_the_claim_waits_are_in_the_version(
    lease_client, model, mlp_bundle, database_url
):
    org, mdl = model
    base = base_state(mlp_bundle[0])
    rnd, tokens = await started_round(lease_client, org, mdl, 5)
    assert "result" in await upload(lease_client, rnd, tokens[0], base, seed=0)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        # A share lock on the round, as an upload being stored holds: the claim waits for it.
        await conn.execute("SELECT id FROM training_rounds WHERE id = %s FOR SHARE", (rnd["id"],))
        aggregation = asyncio.create_task(
            lease_client.call("training.aggregate", {"round_id": rnd["id"]}, org.token)
        )
        await wait_for_lock(database_url, "%aggregation_claim%")
        # Uploads stored while the claim waits are committed before it ...
        for i, token in enumerate(tokens[1:3], 1):
            assert "result" in await upload(lease_client, rnd, token, base, seed=i)
        await conn.rollback()
    version = (await aggregation)["result"]
    # ... so they are in the version; later ones are refused.
    assert version["num_updates"] == 3
    for i, token in enumerate(tokens[3:], 3):
        late = (await upload(lease_client, rnd, token, base, seed=i))["error"]["data"]
        assert late["type"] == "precondition_failed" and late["state"] == "completed"


async def test_uploads_racing_an_aggregation_are_in_its_version_or_refused(
    lease_client, model, mlp_bundle, database_url
):
    org, mdl = model
    base = base_state(mlp_bundle[0])
    rnd, tokens = await started_round(lease_client, org, mdl, 14)
    for i, token in enumerate(tokens[:3]):
        assert "result" in await upload(lease_client, rnd, token, base, seed=i)
    racing = [upload(lease_client, rnd, t, base, seed=i) for i, t in enumerate(tokens[3:], 3)]
    aggregate = lease_client.call("training.aggregate", {"round_id": rnd["id"]}, org.token)
    # The aggregation is sent amid the uploads: some commit before its claim, some after.
    results = await asyncio.gather(*racing[:5], aggregate, *racing[5:])
    version, outcomes = results[5]["result"], results[:5] + results[6:]
    accepted = [o for o in outcomes if "result" in o]
    refused = [o["error"]["data"] for o in outcomes if "error" in o]
    assert version["num_updates"] == 3 + len(accepted)
    assert all(
        r["type"] == "precondition_failed" and r["state"] in ("aggregating", "completed")
        for r in refused
    ), refused
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM training_updates WHERE round_id = %s", (rnd["id"],)
        )
        assert (await cur.fetchone())[0] == version["num_updates"]  # none stored and left out


ADAM = {"eta": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}


async def test_two_branches_from_one_version_do_not_share_server_state(
    lease_client, model, mlp_bundle
):
    org, mdl = model
    net = mlp_bundle[0]
    v1 = base_state(net)
    strategy = {"name": "fedadam", "params": {**ADAM, "eta_l": 0.1}}
    tokens: dict[str, str] = {}
    means = {}

    async def train(name: str, base_version: int, seed: int) -> int:
        rnd, states, counts = await run_round(
            lease_client,
            org,
            mdl,
            net,
            n=2,
            base_version=base_version,
            seed=seed,
            fmt="delta",
            strategy=strategy,
            tokens=tokens,
        )
        means[name] = {
            k: sum(s[k].astype(np.float64) * c for s, c in zip(states, counts, strict=True))
            / sum(counts)
            for k in v1
        }
        version = await lease_client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
        return version["version"]

    first = await train("first", 1, seed=10)  # 1 -> 2
    a = await train("a", first, seed=20)  # 2 -> 3
    b = await train("b", first, seed=30)  # 2 -> 4: from 2's state, not from a's
    c = await train("c", a, seed=40)  # 3 -> 5: continues a's lineage
    d = await train("d", 1, seed=50)  # 1 -> 6: version 1 has no state, a fresh start
    lineages = {
        first: ["first"],
        a: ["first", "a"],
        b: ["first", "b"],
        c: ["first", "a", "c"],
        d: ["d"],
    }
    for version, lineage in lineages.items():
        blobs = await download(lease_client, org.token, mdl["id"], version)
        stored = safetensors.numpy.load(blobs["safetensors"])
        for k, start in v1.items():
            # Reddi et al.'s FedAdam in float64 (tests/kernels), over the lineage's rounds only.
            want = reference_adaptive(start, [means[n][k] for n in lineage], "adam", **ADAM)[-1]
            np.testing.assert_allclose(stored[k], want, rtol=1e-5, atol=1e-5, err_msg=k)
