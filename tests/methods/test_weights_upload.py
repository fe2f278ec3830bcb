"""training.weights.upload: validation before storage, one update per device, objects and rows together."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io

import aiohttp
import msgspec
import numpy as np
import psycopg
import pytest
import safetensors.numpy
import torch
from minio import Minio

from tests.conftest import register_device
from tests.methods.conftest import shared_federation

ROUND_UNKNOWN = "rnd_" + "5" * 32


@pytest.fixture
def settings(settings):
    """Every update in S3: this module checks objects and rows together (the small updates
    kept in their rows by default are tests/methods/test_row_updates.py's)."""
    return msgspec.structs.replace(settings, row_update_max_bytes=0)


MANIFEST = {"fc1.weight": (16, 6), "fc1.bias": (16,), "fc2.weight": (3, 16), "fc2.bias": (3,)}


def bucket_keys(settings, prefix: str = "updates/") -> list[str]:
    s3 = Minio(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, secure=False)
    return [
        o.object_name for o in s3.list_objects(settings.s3_bucket, prefix=prefix, recursive=True)
    ]


def bucket_object(settings, key: str) -> bytes:
    s3 = Minio(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, secure=False)
    response = s3.get_object(settings.s3_bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def update_state(seed: int) -> dict[str, np.ndarray]:
    """A delta with the MLP's tensor names, shapes and dtypes."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.01, shape).astype(np.float32) for name, shape in MANIFEST.items()}


def update_bytes(seed: int) -> bytes:
    return safetensors.numpy.save(update_state(seed))


def run_sql(database_url: str, sql: str, *args) -> None:
    """Arrange state the API cannot reach (a past deadline, a completed round)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql, args)


async def running_round(client, org, model, devices: list[dict], **extra) -> dict:
    """A started round whose selection is exactly ``devices`` (all eligible devices are picked)."""
    params = {
        "model_id": model["id"],
        "base_version": 1,
        # A federation's rounds need at least its min_round_updates (2 here).
        "target_device_count": max(2 if "federation_id" in extra else 1, len(devices)),
        **extra,
    }
    rnd = await client.ok("training.create_round", params, org.token)
    selected = await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    # The owner sees its own devices by id and the members' as a count.
    assert selected["selected_count"] == len(devices)
    assert set(selected["selected"]) <= {d["device_id"] for d in devices}
    return await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)


def upload_params(rnd: dict, data: bytes | None = None, **extra) -> dict:
    params = {
        "round_id": rnd["id"],
        "model_id": rnd["model_id"],
        "version": rnd["base_version"],
        "sample_count": 10,
        "update_format": rnd["update_format"],
        "encoding": "safetensors",
        "weights": {"data": base64.b64encode(update_bytes(1) if data is None else data).decode()},
    }
    return {**params, **extra}


async def presigned_upload(client, token: str, data: bytes, declared: bytes | None = None) -> str:
    declared = data if declared is None else declared
    created = await client.ok(
        "uploads.create",
        {
            "purpose": "weights",
            "size_bytes": len(declared),
            "sha256": hashlib.sha256(declared).hexdigest(),
        },
        token,
    )
    async with aiohttp.ClientSession() as http, http.put(created["url"], data=data) as resp:
        assert resp.status == 200
    return created["upload_id"]


@pytest.fixture
async def devices(client, org) -> list[dict]:
    return [await register_device(client, org.token) for _ in range(2)]


@pytest.fixture
async def rnd(client, org, mlp_model, devices) -> dict:
    return await running_round(client, org, mlp_model, devices)


async def test_selected_device_uploads_and_bytes_and_row_are_stored(
    client, org, settings, rnd, devices
):
    data = update_bytes(7)
    params = upload_params(
        rnd, data, sample_count=42, metrics={"loss": 0.25, "accuracy": 0.875, "f1": 0.5}
    )
    update = await client.ok("training.weights.upload", params, devices[0]["token"])
    assert update["id"].startswith("upd_") and update["round_id"] == rnd["id"]
    assert update["device_id"] == devices[0]["device_id"] and update["org_id"] == org.id
    assert (update["sample_count"], update["size_bytes"]) == (42, len(data))
    assert update["sha256"] == hashlib.sha256(data).hexdigest()
    assert (update["loss"], update["accuracy"], update["metrics"]["f1"]) == (0.25, 0.875, 0.5)
    [key] = bucket_keys(settings)
    assert bucket_object(settings, key) == data
    progress = await client.ok("training.get_round_progress", {"round_id": rnd["id"]}, org.token)
    assert (progress["received_count"], progress["total_samples"]) == (1, 42)


async def test_metrics_are_optional_and_loss_and_accuracy_then_null(client, rnd, devices):
    update = await client.ok("training.weights.upload", upload_params(rnd), devices[0]["token"])
    assert update["loss"] is None and update["accuracy"] is None and update["metrics"] == {}


async def test_torch_encoded_update_is_refused_devices_send_safetensors(
    client, settings, rnd, devices
):
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in update_state(3).items()}, buffer)
    error = await client.error(
        "training.weights.upload",
        upload_params(rnd, buffer.getvalue(), encoding="torch"),
        devices[0]["token"],
    )
    assert error["data"]["type"] == "bad_request" and "safetensors" in error["data"]["message"]
    assert bucket_keys(settings) == []


async def test_update_through_a_presigned_upload(client, settings, rnd, devices):
    data = update_bytes(11)
    upload_id = await presigned_upload(client, devices[0]["token"], data)
    params = upload_params(rnd, weights={"upload_id": upload_id})
    update = await client.ok("training.weights.upload", params, devices[0]["token"])
    assert update["sha256"] == hashlib.sha256(data).hexdigest()
    assert bucket_keys(settings, "uploads/") == [] and len(bucket_keys(settings)) == 1


async def test_upload_whose_bytes_differ_from_the_declared_sha256_is_refused(
    client, settings, rnd, devices
):
    data = bytearray(update_bytes(11))
    data[-1] ^= 0x01
    upload_id = await presigned_upload(
        client, devices[0]["token"], bytes(data), declared=update_bytes(11)
    )
    error = await client.error(
        "training.weights.upload",
        upload_params(rnd, weights={"upload_id": upload_id}),
        devices[0]["token"],
    )
    assert error["data"]["type"] == "bad_request" and error["data"]["field"] == "weights"
    assert bucket_keys(settings) == []


async def test_a_device_cannot_use_another_devices_upload(client, rnd, devices):
    upload_id = await presigned_upload(client, devices[1]["token"], update_bytes(2))
    error = await client.error(
        "training.weights.upload",
        upload_params(rnd, weights={"upload_id": upload_id}),
        devices[0]["token"],
    )
    assert error["data"]["type"] == "forbidden"


async def test_replay_with_the_same_idempotency_key_returns_the_first_result(
    client, settings, rnd, devices
):
    params = upload_params(rnd, idempotency_key="upload-1")
    first = await client.ok("training.weights.upload", params, devices[0]["token"])
    again = await client.ok("training.weights.upload", params, devices[0]["token"])
    assert again == first and len(bucket_keys(settings)) == 1
    reused = await client.error(
        "training.weights.upload",
        upload_params(rnd, update_bytes(2), idempotency_key="upload-1"),
        devices[0]["token"],
    )
    assert reused["data"]["type"] == "conflict"


async def test_second_different_update_is_a_conflict_and_leaves_no_object(
    client, settings, rnd, devices
):
    first = await client.ok(
        "training.weights.upload", upload_params(rnd, update_bytes(1)), devices[0]["token"]
    )
    error = await client.error(
        "training.weights.upload",
        upload_params(rnd, update_bytes(2), sample_count=99),
        devices[0]["token"],
    )
    assert error["data"]["type"] == "conflict"
    assert error["data"]["constraint"] == "training_updates_round_device_key"
    [key] = bucket_keys(settings)
    assert key.endswith(first["id"]) and bucket_object(settings, key) == update_bytes(1)


async def test_concurrent_duplicates_from_one_device_store_exactly_one(
    client, org, settings, rnd, devices
):
    calls = [
        client.call(
            "training.weights.upload", upload_params(rnd, update_bytes(seed)), devices[0]["token"]
        )
        for seed in range(6)
    ]
    answers = await asyncio.gather(*calls)
    accepted = [a["result"] for a in answers if "result" in a]
    assert len(accepted) == 1
    assert {a["error"]["data"]["type"] for a in answers if "error" in a} == {"conflict"}
    [key] = bucket_keys(settings)
    assert key.endswith(accepted[0]["id"])
    progress = await client.ok("training.get_round_progress", {"round_id": rnd["id"]}, org.token)
    assert progress["received_count"] == 1


async def test_fifty_devices_upload_concurrently(client, org, settings, mlp_model):
    devices = await asyncio.gather(*(register_device(client, org.token) for _ in range(50)))
    rnd = await running_round(client, org, mlp_model, devices)
    samples = [3 * i + 1 for i in range(50)]
    calls = [
        client.call(
            "training.weights.upload",
            upload_params(rnd, update_bytes(i), sample_count=n),
            d["token"],
        )
        for i, (d, n) in enumerate(zip(devices, samples, strict=True))
    ]
    answers = await asyncio.gather(*calls)
    assert all("result" in a for a in answers), [a for a in answers if "error" in a][:2]
    assert len(bucket_keys(settings)) == 50
    assert sorted(k.rsplit("/", 1)[1] for k in bucket_keys(settings)) == sorted(
        a["result"]["id"] for a in answers
    )
    progress = await client.ok("training.get_round_progress", {"round_id": rnd["id"]}, org.token)
    assert (progress["received_count"], progress["total_samples"]) == (50, sum(samples))
    stats = await client.ok(
        "training.updates.stats", {"model_id": mlp_model["id"], "version": 1}, org.token
    )
    assert (stats["update_count"], stats["total_samples"]) == (50, sum(samples))


async def test_unknown_round_is_not_found(client, rnd, devices):
    error = await client.error(
        "training.weights.upload", upload_params({**rnd, "id": ROUND_UNKNOWN}), devices[0]["token"]
    )
    assert error["data"]["type"] == "not_found"


async def test_round_not_started_is_a_precondition_failure(
    client, org, settings, mlp_model, devices
):
    params = {"model_id": mlp_model["id"], "base_version": 1, "target_device_count": 2}
    rnd = await client.ok("training.create_round", params, org.token)
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    error = await client.error("training.weights.upload", upload_params(rnd), devices[0]["token"])
    assert error["data"]["type"] == "precondition_failed" and error["data"]["state"] == "selected"
    assert bucket_keys(settings) == []


async def test_cancelled_round_refuses_uploads(client, org, settings, rnd, devices):
    await client.ok("training.cancel_round", {"round_id": rnd["id"]}, org.token)
    error = await client.error("training.weights.upload", upload_params(rnd), devices[0]["token"])
    assert error["data"]["type"] == "precondition_failed" and error["data"]["state"] == "cancelled"
    assert bucket_keys(settings) == []


async def test_completed_round_refuses_uploads(client, settings, database_url, rnd, devices):
    run_sql(
        database_url,
        "UPDATE training_rounds SET state = 'completed', finished_at = now() WHERE id = %s",
        rnd["id"],
    )
    error = await client.error("training.weights.upload", upload_params(rnd), devices[0]["token"])
    assert error["data"]["type"] == "precondition_failed" and error["data"]["state"] == "completed"


async def test_upload_after_the_deadline_is_refused(
    client, org, settings, database_url, mlp_model, devices
):
    rnd = await running_round(client, org, mlp_model, devices, deadline_seconds=10)
    await client.ok("training.weights.upload", upload_params(rnd), devices[0]["token"])
    run_sql(
        database_url,
        "UPDATE training_rounds SET deadline_at = now() - interval '1 second' WHERE id = %s",
        rnd["id"],
    )
    error = await client.error("training.weights.upload", upload_params(rnd), devices[1]["token"])
    assert error["data"]["type"] == "precondition_failed" and error["data"]["state"] == "running"
    assert error["data"]["deadline_at"] is not None
    assert len(bucket_keys(settings)) == 1


async def test_device_not_selected_is_forbidden(client, org, settings, rnd):
    latecomer = await register_device(client, org.token)
    error = await client.error("training.weights.upload", upload_params(rnd), latecomer["token"])
    assert error["data"]["type"] == "forbidden"
    assert bucket_keys(settings) == []


async def test_device_of_another_org_cannot_upload_into_the_round(client, other_org, settings, rnd):
    stranger = await register_device(client, other_org.token)
    error = await client.error("training.weights.upload", upload_params(rnd), stranger["token"])
    assert error["data"]["type"] == "forbidden"
    assert bucket_keys(settings) == []


async def test_org_key_cannot_upload(client, org, rnd):
    assert (await client.error("training.weights.upload", upload_params(rnd), org.token))["data"][
        "type"
    ] == "forbidden"


async def test_device_of_a_member_that_is_no_longer_active_is_forbidden(
    client, org, other_org, database_url, mlp_model
):
    fed = await shared_federation(client, org, other_org, mlp_model, "f")
    theirs = await register_device(client, other_org.token)
    rnd = await running_round(client, org, mlp_model, [theirs], federation_id=fed["id"])
    run_sql(
        database_url,
        "UPDATE federation_members SET status = 'invited' WHERE org_id = %s",
        other_org.id,
    )
    error = await client.error("training.weights.upload", upload_params(rnd), theirs["token"])
    assert error["data"]["type"] == "forbidden"


@pytest.mark.parametrize(
    "override",
    [
        {"model_id": "mdl_" + "6" * 32},
        {"version": 2},
        {"update_format": "weights"},
    ],
)
async def test_upload_must_name_the_rounds_model_version_and_format(
    client, settings, rnd, devices, override
):
    error = await client.error(
        "training.weights.upload", upload_params(rnd, **override), devices[0]["token"]
    )
    assert error["data"]["type"] == "bad_request"
    assert bucket_keys(settings) == []


def _mutated(kind: str) -> bytes:
    state = update_state(5)
    if kind == "shape":
        state["fc1.weight"] = state["fc1.weight"].T.copy()
    elif kind == "dtype":
        state["fc2.bias"] = state["fc2.bias"].astype(np.float64)
    elif kind == "missing":
        del state["fc2.bias"]
    elif kind == "extra":
        state["fc3.weight"] = np.zeros((2, 2), np.float32)
    elif kind == "nan":
        state["fc1.weight"][3, 2] = np.nan
    elif kind == "inf":
        state["fc2.weight"][0, 0] = -np.inf
    elif kind == "corrupt":
        return update_bytes(5)[:-7]
    elif kind == "garbage":
        return np.random.default_rng(0).bytes(600)
    return safetensors.numpy.save(state)


@pytest.mark.parametrize(
    "kind", ["shape", "dtype", "missing", "extra", "nan", "inf", "corrupt", "garbage"]
)
async def test_bad_tensors_are_refused_before_anything_is_stored(
    client, org, settings, rnd, devices, kind
):
    error = await client.error(
        "training.weights.upload", upload_params(rnd, _mutated(kind)), devices[0]["token"]
    )
    assert error["data"]["type"] == "bad_request", error
    assert bucket_keys(settings) == []
    progress = await client.ok("training.get_round_progress", {"round_id": rnd["id"]}, org.token)
    assert progress["received_count"] == 0
    # The refusal does not use up the device's one update.
    await client.ok("training.weights.upload", upload_params(rnd), devices[0]["token"])


async def test_safetensors_bytes_declared_as_torch_are_refused(client, rnd, devices):
    error = await client.error(
        "training.weights.upload", upload_params(rnd, encoding="torch"), devices[0]["token"]
    )
    assert error["data"]["type"] == "bad_request"


async def test_update_far_larger_than_the_manifest_is_too_large(client, settings, rnd, devices):
    state = {**update_state(1), "padding": np.zeros(100_000, np.float32)}
    error = await client.error(
        "training.weights.upload",
        upload_params(rnd, safetensors.numpy.save(state)),
        devices[0]["token"],
    )
    assert error["data"]["type"] == "payload_too_large"
    assert bucket_keys(settings) == []


async def test_body_over_the_limit_is_refused_with_413(client, settings, rnd, devices):
    params = upload_params(rnd, b"\0" * (settings.max_body_bytes * 3 // 4 + 1024))
    body = msgspec.json.encode(
        {"jsonrpc": "2.0", "method": "training.weights.upload", "params": params, "id": 1}
    )
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {devices[0]['token']}"}
    resp = await client.http.post("/rpc", data=io.BytesIO(body), headers=headers)
    answer = msgspec.json.decode(await resp.read())
    assert resp.status == 413 and answer["error"]["data"]["type"] == "payload_too_large"
    assert bucket_keys(settings) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"sample_count": 0},
        {"sample_count": -3},
        {"metrics": {"loss": "low"}},
        {"metrics": {"": 1.0}},
        {"metrics": {f"m{i}": 1.0 for i in range(33)}},
        {"encoding": "pickle"},
        {"weights": {"data": "***"}},
    ],
)
async def test_upload_params_are_validated(client, rnd, devices, bad):
    error = await client.error(
        "training.weights.upload", upload_params(rnd, **bad), devices[0]["token"]
    )
    assert error["code"] == -32602


async def test_infinite_metric_is_invalid(client, rnd, devices):
    body = (
        b'{"jsonrpc":"2.0","id":1,"method":"training.weights.upload","params":{"round_id":"'
        + rnd["id"].encode()
        + b'","model_id":"'
        + rnd["model_id"].encode()
        + b'","version":1,"sample_count":1,'
        b'"weights":{"data":"AAAA"},"metrics":{"loss":1e999}}}'
    )
    _, answer = await client.post(body, devices[0]["token"], raw=True)
    assert answer["error"]["code"] == -32602 and answer["error"]["data"]["path"] == "$.metrics[...]"


async def test_a_failure_after_the_row_committed_keeps_the_object_it_names(
    client, org, settings, rnd, devices, monkeypatch
):
    # The row commits, then the answer is lost on the way back (a dropped connection). The
    # cleanup of the failed call must not delete the object the committed row names, or the
    # round's aggregation finds a stored update missing.
    import methods.training.weights as weights

    committed = weights._insert

    async def insert_then_lose_the_reply(*args, **kwargs):
        await committed(*args, **kwargs)
        raise ConnectionResetError("the reply was lost")

    monkeypatch.setattr(weights, "_insert", insert_then_lose_the_reply)
    data = update_bytes(3)
    error = await client.error(
        "training.weights.upload", upload_params(rnd, data), devices[0]["token"]
    )
    assert error["code"] == -32603
    monkeypatch.undo()

    [key] = bucket_keys(settings)
    assert bucket_object(settings, key) == data
    await client.ok(
        "training.weights.upload", upload_params(rnd, update_bytes(4)), devices[1]["token"]
    )
    version = await client.ok(
        "training.aggregate", {"round_id": rnd["id"], "min_updates": 2}, org.token
    )
    assert version["num_updates"] == 2
