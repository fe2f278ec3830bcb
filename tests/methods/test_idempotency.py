"""Idempotency records: owned by their call, scoped to the principal, sealed at rest."""

from __future__ import annotations

import asyncio

import psycopg

from fedrpc.app import SERVICES
from fedrpc.auth import Principal
from fedrpc.errors import Conflict
from fedrpc.idempotency import run_once


async def test_two_keys_of_one_org_do_not_share_a_replay(client, org):
    # The scope is the principal: a second admin key of the same org reusing an idempotency
    # key (e.g. two CI jobs that both count from 1) runs its own call, and never receives
    # the first key's result, which holds a token.
    second = await client.ok("orgs.api_keys.create", {"name": "ci"}, org.token)
    params = {"name": "deploy", "idempotency_key": "job-1"}
    first = await client.ok("orgs.api_keys.create", params, org.token)
    other = await client.ok("orgs.api_keys.create", params, second["token"])
    assert other["id"] != first["id"] and other["token"] != first["token"]
    # Each principal's replay still answers with its own first result.
    assert await client.ok("orgs.api_keys.create", params, org.token) == first
    assert await client.ok("orgs.api_keys.create", params, second["token"]) == other


async def test_a_replayed_token_is_not_stored_in_plaintext(client, org, database_url):
    params = {"name": "ci", "idempotency_key": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"}
    created = await client.ok("orgs.api_keys.create", params, org.token)
    assert await client.ok("orgs.api_keys.create", params, org.token) == created
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT * FROM idempotency_keys").fetchall()
    assert len(rows) == 1
    stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in rows[0])
    for secret in (created["token"], params["idempotency_key"]):
        assert secret.encode() not in stored
    # The token's random part alone, in case a column held it without its prefix.
    assert created["token"][3:].encode() not in stored


async def test_the_same_key_with_other_params_is_a_conflict(client, org):
    await client.ok("orgs.api_keys.create", {"name": "a", "idempotency_key": "k"}, org.token)
    error = await client.error(
        "orgs.api_keys.create", {"name": "b", "idempotency_key": "k"}, org.token
    )
    assert error["data"]["type"] == "conflict"


async def test_a_call_whose_claim_was_taken_over_cannot_overwrite_or_release_it(
    client, org, database_url
):
    # A slow call outlives the ten-minute stale limit; a retry takes its claim over and
    # completes. The slow call then finishes (or fails): the record stays the retry's.
    db = client.app[SERVICES].db
    principal = Principal(kind="org", org_id=org.id, key_id="key_of_this_test")
    stalled, go_on = asyncio.Event(), asyncio.Event()

    async def slow() -> bytes:
        stalled.set()
        await go_on.wait()
        return b'"slow"'

    async def fast() -> bytes:
        return b'"fast"'

    async def failing() -> bytes:
        stalled.set()
        await go_on.wait()
        raise RuntimeError("the slow call fails after losing its claim")

    for late in (slow, failing):
        key = f"k-{late.__name__}"
        stalled.clear(), go_on.clear()
        first = asyncio.create_task(run_once(db, principal, "m", key, b"h", late))
        await stalled.wait()
        # A second call meanwhile is told the first is in progress.
        try:
            await run_once(db, principal, "m", key, b"h", fast)
            raise AssertionError("a concurrent call ran while the claim was held")
        except Conflict:
            pass
        with psycopg.connect(database_url) as conn:
            conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '11 minutes'")
        assert await run_once(db, principal, "m", key, b"h", fast) == b'"fast"'
        go_on.set()
        try:
            await first
        except RuntimeError:
            assert late is failing
        # The record is the retry's: a replay answers "fast", not the late call's result,
        # and the late call's failure did not delete it.
        assert await run_once(db, principal, "m", key, b"h", slow) == b'"fast"'


async def test_a_key_with_a_nul_is_an_ordinary_key(client, org):
    # Only its sha256 reaches Postgres, so a NUL in the key (which text columns cannot hold)
    # needs no refusal: it replays like any other key.
    params = {"name": "keyboard", "idempotency_key": "k\u0000"}
    created = await client.ok("models.create", params, org.token)
    assert await client.ok("models.create", params, org.token) == created
    assert (await client.ok("models.list", {}, org.token))["total"] == 1
