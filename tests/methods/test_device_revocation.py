"""devices.revoke and devices.rotate_token, and how far a revocation reaches.

Two server processes are played by two apps on the same database, each with
its own auth cache: a revocation on one reaches the other within
``auth_cache_seconds``, and a lookup in flight at revocation time does not put
the revoked principal back into the cache.
"""

from __future__ import annotations

import asyncio
import base64
import time

import msgspec
import numpy as np
import pytest
import safetensors.numpy

from fedrpc.app import SERVICES, create_app
from fedrpc.auth import Authenticator
from tests.conftest import RpcClient, register_device

UNKNOWN_DEVICE = "dev_" + "0" * 32
MLP = {"fc1.weight": (16, 6), "fc1.bias": (16,), "fc2.weight": (3, 16), "fc2.bias": (3,)}


@pytest.fixture
def make_client(aiohttp_client, settings):
    """Another server process on the same database, with an auth cache of ``ttl`` seconds."""

    async def make(ttl: float) -> RpcClient:
        app = create_app(msgspec.structs.replace(settings, auth_cache_seconds=ttl))
        return RpcClient(await aiohttp_client(app))

    return make


async def status_of(client, token: str, method: str = "devices.sync", params=None) -> int:
    envelope = {"jsonrpc": "2.0", "method": method, "params": params or {}, "id": 1}
    resp, _ = await client.post(envelope, token)
    return resp.status


def upload_of(rnd: dict, value: float) -> dict:
    """training.weights.upload params: a delta of the MLP with every value `value`."""
    weights = {name: np.full(shape, value, np.float32) for name, shape in MLP.items()}
    return {
        "round_id": rnd["id"],
        "model_id": rnd["model_id"],
        "version": rnd["base_version"],
        "sample_count": 10,
        "update_format": rnd["update_format"],
        "weights": {"data": base64.b64encode(safetensors.numpy.save(weights)).decode()},
    }


def assert_error(error: dict, type_: str) -> None:
    assert error["data"]["type"] == type_, error


# devices.revoke


async def test_revoke_returns_the_time_and_reason_and_the_token_dies(client, org):
    device = await register_device(client, org.token)
    await client.ok("devices.sync", {}, device["token"])
    revoked = await client.ok(
        "devices.revoke", {"device_id": device["device_id"], "reason": "stolen"}, org.token
    )
    assert revoked["device_id"] == device["device_id"] and revoked["revoke_reason"] == "stolen"
    assert await status_of(client, device["token"]) == 401
    record = await client.ok("devices.get", {"device_id": device["device_id"]}, org.token)
    assert record["revoked_at"] == revoked["revoked_at"] and record["revoke_reason"] == "stolen"


async def test_revoking_twice_keeps_the_first_time_and_reason(client, org):
    device = await register_device(client, org.token)
    first = await client.ok(
        "devices.revoke", {"device_id": device["device_id"], "reason": "lost"}, org.token
    )
    again = await client.ok(
        "devices.revoke", {"device_id": device["device_id"], "reason": "other"}, org.token
    )
    assert again == first


async def test_revoke_clears_the_cache_of_the_serving_process_at_once(make_client, org):
    cached = await make_client(60.0)
    device = await register_device(cached, org.token)
    await cached.ok("devices.sync", {}, device["token"])  # now in the cache for a minute
    await cached.ok("devices.revoke", {"device_id": device["device_id"]}, org.token)
    assert await status_of(cached, device["token"]) == 401


async def test_revocation_reaches_another_process_within_the_cache_ttl(make_client, org):
    serving, other = await make_client(0.5), await make_client(0.5)
    device = await register_device(serving, org.token)
    await other.ok("devices.sync", {}, device["token"])  # cached by the other process
    revoked_at = time.monotonic()
    await serving.ok("devices.revoke", {"device_id": device["device_id"]}, org.token)
    await asyncio.sleep(max(0.0, revoked_at + 0.5 - time.monotonic()))
    assert await status_of(other, device["token"]) == 401


async def test_key_revocation_reaches_another_process_within_the_cache_ttl(make_client, org):
    serving, other = await make_client(0.5), await make_client(0.5)
    key = await serving.ok("orgs.api_keys.create", {"name": "ci"}, org.token)
    await other.ok("models.list", {}, key["token"])
    revoked_at = time.monotonic()
    await serving.ok("orgs.api_keys.revoke", {"key_id": key["id"]}, org.token)
    await asyncio.sleep(max(0.0, revoked_at + 0.5 - time.monotonic()))
    assert await status_of(other, key["token"], "models.list") == 401


async def test_a_revoked_device_is_not_selected(client, org, mlp_model):
    kept = await register_device(client, org.token)
    gone = await register_device(client, org.token)
    await client.ok("devices.revoke", {"device_id": gone["device_id"]}, org.token)
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 10}
    rnd = await client.ok("training.create_round", params, org.token)
    selected = await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    assert selected["selected"] == [kept["device_id"]] and selected["eligible_count"] == 1


async def test_a_revoked_device_cannot_upload_to_a_round_it_was_selected_in(
    make_client, org, mlp_model
):
    cached = await make_client(60.0)
    device = await register_device(cached, org.token)
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 1}
    rnd = await cached.ok("training.create_round", params, org.token)
    await cached.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    rnd = await cached.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    offers = await cached.ok("devices.sync", {}, device["token"])
    assert [o["round_id"] for o in offers["desired_state"]["round_offers"]] == [rnd["id"]]
    await cached.ok("devices.revoke", {"device_id": device["device_id"]}, org.token)
    upload = upload_of(rnd, 0.0)
    assert await status_of(cached, device["token"], "training.weights.upload", upload) == 401
    progress = await cached.ok("training.get_round_progress", {"round_id": rnd["id"]}, org.token)
    assert progress["received_count"] == 0


async def test_a_revoked_device_cached_by_another_process_stores_no_update(
    make_client, org, mlp_model
):
    # The other process still holds the device's principal for a minute: authentication
    # lets the call through, the upload itself must not.
    serving, other = await make_client(0.0), await make_client(60.0)
    device = await register_device(serving, org.token)
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 1}
    rnd = await serving.ok("training.create_round", params, org.token)
    await serving.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    rnd = await serving.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    await other.ok("devices.sync", {}, device["token"])  # cached by the other process
    await serving.ok("devices.revoke", {"device_id": device["device_id"]}, org.token)
    upload = upload_of(rnd, 0.0)
    assert_error(await other.error("training.weights.upload", upload, device["token"]), "forbidden")
    progress = await serving.ok("training.get_round_progress", {"round_id": rnd["id"]}, org.token)
    assert progress["received_count"] == 0


async def test_updates_of_a_device_revoked_before_aggregation_are_left_out(client, org, mlp_model):
    devices = [await register_device(client, org.token) for _ in range(2)]
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 2}
    rnd = await client.ok("training.create_round", params, org.token)
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    rnd = await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    for i, device in enumerate(devices):
        upload = upload_of(rnd, i + 1.0)
        await client.ok("training.weights.upload", upload, device["token"])
    # A compromised device is revoked after it uploaded: its update must not shape the model.
    await client.ok("devices.revoke", {"device_id": devices[1]["device_id"]}, org.token)
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    assert version["num_updates"] == 1


async def test_an_org_may_not_revoke_another_orgs_device(client, org, other_org):
    theirs = await register_device(client, other_org.token)
    error = await client.error("devices.revoke", {"device_id": theirs["device_id"]}, org.token)
    assert_error(error, "forbidden")
    await client.ok("devices.sync", {}, theirs["token"])


async def test_a_device_may_not_revoke_devices(client, org):
    device = await register_device(client, org.token)
    peer = await register_device(client, org.token)
    params = {"device_id": peer["device_id"]}
    assert_error(await client.error("devices.revoke", params, device["token"]), "forbidden")
    await client.ok("devices.sync", {}, peer["token"])


async def test_an_enrollment_key_may_not_revoke_devices(client, org):
    device = await register_device(client, org.token)
    key = await client.ok("orgs.api_keys.create", {"name": "app", "scope": "enroll"}, org.token)
    params = {"device_id": device["device_id"]}
    assert_error(await client.error("devices.revoke", params, key["token"]), "forbidden")


async def test_revoking_an_unknown_device_is_not_found(client, org):
    error = await client.error("devices.revoke", {"device_id": UNKNOWN_DEVICE}, org.token)
    assert_error(error, "not_found")


async def test_revoke_needs_a_token(client):
    resp, _ = await client.post(
        {"jsonrpc": "2.0", "method": "devices.revoke", "params": {"device_id": UNKNOWN_DEVICE}}
    )
    assert resp.status == 401


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({}, "$"),
        ({"device_id": "dev_x"}, "$.device_id"),
        ({"device_id": UNKNOWN_DEVICE, "reason": "r" * 513}, "$.reason"),
        ({"device_id": UNKNOWN_DEVICE, "reason": 5}, "$.reason"),
        ({"device_id": UNKNOWN_DEVICE, "force": True}, "$"),
    ],
)
async def test_revoke_refuses_bad_params(client, org, params, path):
    error = await client.error("devices.revoke", params, org.token)
    assert error["code"] == -32602 and error["data"]["path"] == path, error


# devices.rotate_token


async def test_rotate_token_gives_a_new_token_and_kills_the_old_one_at_once(make_client, org):
    cached = await make_client(60.0)
    device = await register_device(cached, org.token)
    await cached.ok("devices.sync", {}, device["token"])  # the old token is in the cache
    rotated = await cached.ok("devices.rotate_token", {}, device["token"])
    assert rotated["device_id"] == device["device_id"]
    assert rotated["token"].startswith("fd_") and rotated["token"] != device["token"]
    assert await status_of(cached, device["token"]) == 401
    synced = await cached.ok("devices.sync", {}, rotated["token"])
    assert synced["device_id"] == device["device_id"]


async def test_a_rotated_token_cannot_rotate_again_on_a_process_that_still_caches_it(
    make_client, org
):
    serving, other = await make_client(60.0), await make_client(60.0)
    device = await register_device(serving, org.token)
    await other.ok("devices.sync", {}, device["token"])  # cached there for a minute
    rotated = await serving.ok("devices.rotate_token", {}, device["token"])
    error = await other.error("devices.rotate_token", {}, device["token"])
    assert_error(error, "unauthorized")
    await serving.ok("devices.sync", {}, rotated["token"])  # the rightful holder keeps its device


async def test_an_org_key_may_not_rotate_a_device_token(client, org):
    assert_error(await client.error("devices.rotate_token", {}, org.token), "forbidden")


async def test_an_enrollment_key_may_not_rotate_tokens(client, org):
    key = await client.ok("orgs.api_keys.create", {"name": "app", "scope": "enroll"}, org.token)
    assert_error(await client.error("devices.rotate_token", {}, key["token"]), "forbidden")


async def test_a_revoked_device_cannot_rotate_its_token(client, org):
    device = await register_device(client, org.token)
    await client.ok("devices.revoke", {"device_id": device["device_id"]}, org.token)
    assert await status_of(client, device["token"], "devices.rotate_token") == 401


async def test_rotate_token_refuses_unknown_params(client, org):
    device = await register_device(client, org.token)
    error = await client.error("devices.rotate_token", {"token": "fd_mine"}, device["token"])
    assert error["code"] == -32602 and error["data"]["path"] == "$", error
    await client.ok("devices.sync", {}, device["token"])


# The auth cache itself


async def test_a_lookup_in_flight_at_revocation_does_not_refill_the_cache(client, org):
    device = await register_device(client, org.token)
    auth = Authenticator(client.app[SERVICES].db, ttl_seconds=60.0)
    header = f"Bearer {device['token']}"
    lookup = asyncio.create_task(auth.authenticate(header))
    await asyncio.sleep(0)
    assert not lookup.done()  # the lookup is waiting on the database
    auth.forget(device_id=device["device_id"])  # what devices.revoke does after its UPDATE
    principal = await lookup
    assert principal.device_id == device["device_id"]  # the call that started before still runs
    assert auth.cached(header) is None


async def test_use_never_extends_a_cache_entry(client, org):
    device = await register_device(client, org.token)
    auth = Authenticator(client.app[SERVICES].db, ttl_seconds=0.3)
    header = f"Bearer {device['token']}"
    started = time.monotonic()
    await auth.authenticate(header)
    while time.monotonic() - started < 0.25:
        assert await auth.authenticate(header) is auth.cached(header) is not None
        await asyncio.sleep(0.02)
    await asyncio.sleep(max(0.0, started + 0.3 - time.monotonic()))
    assert auth.cached(header) is None
