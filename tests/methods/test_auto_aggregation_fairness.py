"""Auto-aggregation: one tenant's due rounds cannot stall another's (round-robin, back-off)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import msgspec
import psycopg
import pytest

from fedrpc.app import SERVICES
from fedrpc.storage import Storage
from fedrpc.tasks import aggregate_due_rounds
from tests.conftest import register_device
from tests.methods.conftest import inline
from tests.methods.test_aggregate import run_round


async def own_model(client, org, mlp_bundle) -> dict:
    """A model of ``org`` (no federation: each org trains its own) with version 1."""
    model = await client.ok("models.create", {"name": "mlp"}, org.token)
    await client.ok(
        "models.versions.create", {"model_id": model["id"], **inline(mlp_bundle[1])}, org.token
    )
    return model


async def started_round(client, org, model, **params) -> dict:
    """A running round on ``model`` with its devices selected and no update yet."""
    rnd = await client.ok(
        "training.create_round", {"model_id": model["id"], "base_version": 1, **params}, org.token
    )
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    return rnd


def sql(database_url: str, query: str, *args) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


def schedule(database_url: str, round_id: str) -> tuple:
    """(state, attempts, seconds until the next attempt, last error, failure reason)."""
    return sql(
        database_url,
        "SELECT state, aggregation_attempts, extract(epoch FROM next_aggregation_at - now())::float,"
        " last_aggregation_error, failure_reason FROM training_rounds WHERE id = %s",
        round_id,
    )[0]


def retry_now(database_url: str, round_id: str) -> None:
    """Let a backed-off round's time come (instead of waiting for it)."""
    sql(
        database_url,
        "UPDATE training_rounds SET next_aggregation_at = now() - interval '1 second' WHERE id = %s",
        round_id,
    )


def with_settings(client, storage: Storage | None = None, **settings):
    """The app's services with other settings (or another storage) for one pass."""
    services = client.app[SERVICES]
    return dataclasses.replace(
        services,
        settings=msgspec.structs.replace(services.settings, **settings),
        storage=storage or services.storage,
    )


@pytest.fixture
def dead_storage(settings):
    """A real Storage pointed at a port where nothing listens: S3 is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        yield Storage(
            f"127.0.0.1:{sock.getsockname()[1]}",
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_bucket,
        )


async def auto_round(client, org, model, mlp_bundle, tokens=None) -> dict:
    """A running auto round of one device that has uploaded (so it is due)."""
    rnd, _, _ = await run_round(
        client, org, model, mlp_bundle[0], n=1, extra={"auto_aggregate": True}, tokens=tokens
    )
    return rnd


async def state_of(client, org, round_id) -> dict:
    return await client.ok("training.get_round", {"round_id": round_id}, org.token)


async def test_ten_secure_aggregation_rounds_do_not_stall_another_orgs_auto_round(
    client, org, other_org, mlp_bundle, database_url
):
    # Org A: ten secure-aggregation auto rounds with the shortest deadline, now past it.
    model_a = await own_model(client, org, mlp_bundle)
    for _ in range(2):
        await register_device(client, org.token)
    secagg = [
        await started_round(
            client,
            org,
            model_a,
            target_device_count=2,
            secure_aggregation={"threshold": 2},
            auto_aggregate=True,
            deadline_seconds=10,
        )
        for _ in range(10)
    ]
    sql(
        database_url,
        "UPDATE training_rounds SET deadline_at = now() - interval '1 second' WHERE id = ANY(%s)",
        [r["id"] for r in secagg],
    )
    # Org B: one ordinary auto round with every update in.
    model_b = await own_model(client, other_org, mlp_bundle)
    b_round = await auto_round(client, other_org, model_b, mlp_bundle)

    for _ in range(2):
        await aggregate_due_rounds(client.app[SERVICES])

    done = await state_of(client, other_org, b_round["id"])
    assert done["state"] == "completed" and done["result_version"] == 2
    for rnd in secagg:
        failed = await state_of(client, org, rnd["id"])
        assert failed["state"] == "failed" and "SecAgg+ session" in failed["failure_reason"]
    running = await client.ok("training.list_rounds", {"state": "running"}, org.token)
    assert running["total"] == 0


async def test_an_org_with_many_due_rounds_cannot_starve_another_under_the_pass_budget(
    client, org, other_org, mlp_bundle
):
    model_a = await own_model(client, org, mlp_bundle)
    tokens: dict[str, str] = {}  # the org's devices from earlier rounds are eligible again
    a_rounds = [await auto_round(client, org, model_a, mlp_bundle, tokens) for _ in range(11)]
    model_b = await own_model(client, other_org, mlp_bundle)
    b_round = await auto_round(client, other_org, model_b, mlp_bundle)
    budget = with_settings(client, aggregation_rounds_per_pass=4)

    await aggregate_due_rounds(budget)

    assert (await state_of(client, other_org, b_round["id"]))["state"] == "completed"
    states = [(await state_of(client, org, r["id"]))["state"] for r in a_rounds]
    # Round-robin: A's oldest, B's, then A's next two; the pass does no more than 4.
    assert states == ["completed"] * 3 + ["running"] * 8
    for _ in range(2):
        await aggregate_due_rounds(budget)
    states = [(await state_of(client, org, r["id"]))["state"] for r in a_rounds]
    assert states == ["completed"] * 11


async def test_two_concurrent_passes_take_up_each_round_once(
    client, org, other_org, mlp_bundle, database_url
):
    model_a = await own_model(client, org, mlp_bundle)
    model_b = await own_model(client, other_org, mlp_bundle)
    tokens = {org.id: {}, other_org.id: {}}
    rounds = [
        await auto_round(client, who, model, mlp_bundle, tokens[who.id])
        for who, model in [(org, model_a)] * 3 + [(other_org, model_b)] * 2
    ]

    await asyncio.gather(*(aggregate_due_rounds(client.app[SERVICES]) for _ in range(2)))

    for rnd in rounds:
        state, attempts, _, error, _ = schedule(database_url, rnd["id"])
        assert (state, attempts, error) == ("completed", 1, None)


async def test_a_round_that_fails_for_a_passing_reason_backs_off_behind_the_others(
    client, org, other_org, mlp_bundle, database_url, dead_storage
):
    model_a = await own_model(client, org, mlp_bundle)
    x = await auto_round(client, org, model_a, mlp_bundle)
    backoff = {"aggregation_backoff_seconds": 60, "aggregation_max_attempts": 5}

    await aggregate_due_rounds(with_settings(client, dead_storage, **backoff))

    state, attempts, wait, error, _ = schedule(database_url, x["id"])
    assert (state, attempts, error) == ("running", 1, "object storage is unreachable")
    assert 50 < wait <= 60
    # Storage is back, but X waits its turn while another org's round completes.
    model_b = await own_model(client, other_org, mlp_bundle)
    y = await auto_round(client, other_org, model_b, mlp_bundle)
    await aggregate_due_rounds(with_settings(client, **backoff))
    assert (await state_of(client, other_org, y["id"]))["state"] == "completed"
    assert schedule(database_url, x["id"])[:2] == ("running", 1)
    # The back-off doubles with each failed attempt ...
    retry_now(database_url, x["id"])
    await aggregate_due_rounds(with_settings(client, dead_storage, **backoff))
    state, attempts, wait, _, _ = schedule(database_url, x["id"])
    assert (state, attempts) == ("running", 2) and 110 < wait <= 120
    # ... and once its time has come and storage answers, the round completes.
    retry_now(database_url, x["id"])
    await aggregate_due_rounds(with_settings(client, **backoff))
    done = await state_of(client, org, x["id"])
    assert done["state"] == "completed" and done["result_version"] == 2


async def test_a_round_that_keeps_failing_fails_with_the_reason_after_the_last_attempt(
    client, org, mlp_bundle, database_url, dead_storage
):
    model = await own_model(client, org, mlp_bundle)
    rnd = await auto_round(client, org, model, mlp_bundle)
    down = with_settings(client, dead_storage, aggregation_max_attempts=2)

    await aggregate_due_rounds(down)
    assert schedule(database_url, rnd["id"])[0] == "running"
    retry_now(database_url, rnd["id"])
    await aggregate_due_rounds(down)

    failed = await state_of(client, org, rnd["id"])
    assert failed["state"] == "failed"
    assert failed["failure_reason"] == (
        "automatic aggregation failed 2 times; last error: object storage is unreachable"
    )
    assert (await client.ok("models.versions.list", {"model_id": model["id"]}, org.token))[
        "total"
    ] == 1


async def test_a_strategy_that_cannot_combine_the_updates_fails_the_auto_round_at_once(
    client, org, mlp_bundle
):
    model = await own_model(client, org, mlp_bundle)
    rnd, _, _ = await run_round(
        client,
        org,
        model,
        mlp_bundle[0],
        n=2,
        strategy={"name": "bulyan", "params": {"num_malicious": 1}},
        extra={"auto_aggregate": True},
    )

    await aggregate_due_rounds(client.app[SERVICES])

    failed = await state_of(client, org, rnd["id"])
    assert failed["state"] == "failed" and "bulyan" in failed["failure_reason"].lower()
