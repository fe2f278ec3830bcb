"""orgs.get and orgs.api_keys.*: the caller's org and its keys."""

from __future__ import annotations

import hashlib


async def test_get_returns_the_callers_org(client, org):
    result = await client.ok("orgs.get", {}, org.token)
    assert result["id"] == org.id and result["name"] == "acme"


async def test_get_of_another_org_is_forbidden(client, org, other_org):
    error = await client.error("orgs.get", {"org_id": other_org.id}, org.token)
    assert error["data"]["type"] == "forbidden"


async def test_created_key_works_and_is_listed_without_its_token(client, org):
    created = await client.ok("orgs.api_keys.create", {"name": "ci"}, org.token)
    assert created["token"].startswith("fk_") and created["prefix"] == created["token"][:8]
    assert (await client.ok("system.ping", None, created["token"]))["principal"] == f"org:{org.id}"
    listed = await client.ok("orgs.api_keys.list", {}, org.token)
    assert listed["total"] == 2 and {k["name"] for k in listed["items"]} == {"admin", "ci"}
    assert all("token" not in k for k in listed["items"])


async def test_revoked_key_is_refused_at_once(client, org):
    created = await client.ok("orgs.api_keys.create", {"name": "temp"}, org.token)
    await client.ok("system.ping", None, created["token"])
    revoked = await client.ok("orgs.api_keys.revoke", {"key_id": created["id"]}, org.token)
    assert revoked["id"] == created["id"]
    resp, body = await client.post(
        {"jsonrpc": "2.0", "method": "system.ping", "id": 1}, created["token"]
    )
    assert resp.status == 401 and body["error"]["data"]["type"] == "unauthorized"
    listed = await client.ok("orgs.api_keys.list", {"include_revoked": True}, org.token)
    assert [k["revoked_at"] is not None for k in listed["items"] if k["id"] == created["id"]] == [
        True
    ]
    assert (await client.ok("orgs.api_keys.list", {}, org.token))["total"] == 1


async def test_revoking_another_orgs_key_is_forbidden(client, org, other_org):
    created = await client.ok("orgs.api_keys.create", {"name": "theirs"}, other_org.token)
    error = await client.error("orgs.api_keys.revoke", {"key_id": created["id"]}, org.token)
    assert error["data"]["type"] == "forbidden"
    await client.ok("system.ping", None, created["token"])


async def test_revoking_an_unknown_key_is_not_found(client, org):
    error = await client.error("orgs.api_keys.revoke", {"key_id": "key_" + "0" * 32}, org.token)
    assert error["data"]["type"] == "not_found"


async def test_key_params_are_validated(client, org):
    cases = [
        ({}, "$"),  # name missing
        ({"name": ""}, "$.name"),
        ({"name": 5}, "$.name"),
        ({"name": "x" * 129}, "$.name"),
        ({"name": "a", "extra": 1}, "$"),  # an unknown field is the object's fault
    ]
    for params, path in cases:
        error = await client.error("orgs.api_keys.create", params, org.token)
        assert error["code"] == -32602 and error["data"]["type"] == "bad_request", error
        assert error["data"]["path"] == path, (params, error)
    error = await client.error("orgs.api_keys.revoke", {"key_id": "not-an-id"}, org.token)
    assert error["code"] == -32602 and error["data"]["type"] == "bad_request"
    assert error["data"]["path"] == "$.key_id"


async def test_idempotent_key_creation_replays_the_first_result(client, org):
    first = await client.ok(
        "orgs.api_keys.create", {"name": "once", "idempotency_key": "k1"}, org.token
    )
    again = await client.ok(
        "orgs.api_keys.create", {"name": "once", "idempotency_key": "k1"}, org.token
    )
    assert again == first
    assert (await client.ok("orgs.api_keys.list", {}, org.token))["total"] == 2
    error = await client.error(
        "orgs.api_keys.create", {"name": "other", "idempotency_key": "k1"}, org.token
    )
    assert error["data"]["type"] == "conflict"


async def test_failed_call_does_not_burn_its_idempotency_key(client, org, other_org):
    theirs = await client.ok("orgs.api_keys.create", {"name": "t"}, other_org.token)
    params = {"key_id": theirs["id"], "idempotency_key": "retry-me"}
    assert (await client.error("orgs.api_keys.revoke", params, org.token))["data"][
        "type"
    ] == "forbidden"
    assert (await client.error("orgs.api_keys.revoke", params, org.token))["data"][
        "type"
    ] == "forbidden"


async def test_stored_replays_are_purged_after_the_window(client, org, database_url):
    import psycopg

    from fedrpc.app import SERVICES
    from fedrpc.tasks import purge_idempotency_keys

    await client.ok("orgs.api_keys.create", {"name": "old", "idempotency_key": "k-old"}, org.token)
    await client.ok("orgs.api_keys.create", {"name": "new", "idempotency_key": "k-new"}, org.token)
    old, new = (hashlib.sha256(key).digest() for key in (b"k-old", b"k-new"))
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"
            " WHERE key_hash = %s",
            (old,),
        )
    await purge_idempotency_keys(client.app[SERVICES])
    with psycopg.connect(database_url) as conn:
        kept = [bytes(r[0]) for r in conn.execute("SELECT key_hash FROM idempotency_keys")]
    assert kept == [new]
