"""training.personalized.*: upsert, read, metrics and list, through real HTTP against Postgres and S3."""

from __future__ import annotations

import hashlib
import io

import aiohttp
import numpy as np
import psycopg
import pytest
import safetensors.numpy
import torch
from minio import Minio

from tests.conftest import register_device
from tests.methods.conftest import b64, shared_federation

MODEL_UNKNOWN = "mdl_" + "7" * 32
FEDERATION_UNKNOWN = "fed_" + "8" * 32
DEVICE_UNKNOWN = "dev_" + "9" * 32
HEAD = ["fc2.bias", "fc2.weight"]


def bucket_keys(settings, prefix: str = "") -> list[str]:
    s3 = Minio(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, secure=False)
    return sorted(
        o.object_name for o in s3.list_objects(settings.s3_bucket, prefix=prefix, recursive=True)
    )


def read_object(settings, key: str) -> bytes:
    s3 = Minio(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, secure=False)
    response = s3.get_object(settings.s3_bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def state_rows(settings) -> list[tuple]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(
            "SELECT device_id, model_id, federation_id, weights_key FROM personalized_states "
            "ORDER BY device_id, model_id"
        ).fetchall()


@pytest.fixture
def base_state(mlp_bundle) -> dict[str, np.ndarray]:
    return safetensors.numpy.load(mlp_bundle[1]["weights"])


def shifted(state: dict[str, np.ndarray], by: float, names=None) -> dict[str, np.ndarray]:
    return {
        k: (v + np.float32(by)).astype(v.dtype)
        for k, v in state.items()
        if names is None or k in names
    }


def params(model: dict, state: dict[str, np.ndarray] | None = None, **extra) -> dict:
    base = {"model_id": model["id"], "personalization_type": "ditto"}
    if state is not None:
        base["weights"] = {"data": b64(safetensors.numpy.save(state))}
    return {**base, **extra}


def assert_invalid(error: dict, path: str) -> None:
    assert error["code"] == -32602 and error["data"]["type"] == "bad_request", error
    assert error["data"]["path"] == path, error


@pytest.fixture
async def device(client, org) -> dict:
    return await register_device(client, org.token)


@pytest.fixture
async def federation(client, org, other_org, mlp_model) -> dict:
    """`org` owns it and shares the MLP into it; `other_org` is an active member."""
    fed = await shared_federation(client, org, other_org, mlp_model, "f")
    return fed


# --- update ---------------------------------------------------------------------------------------------------


async def test_update_creates_then_replaces_with_the_same_result_shape(
    client, device, mlp_model, base_state, settings
):
    first = await client.ok(
        "training.personalized.update",
        params(mlp_model, shifted(base_state, 0.5), metrics={"loss": 0.5}, round_number=3),
        device["token"],
    )
    assert first["created"] is True
    state = first["state"]
    assert (state["device_id"], state["model_id"], state["federation_id"]) == (
        device["device_id"],
        mlp_model["id"],
        None,
    )
    assert (
        state["metrics"] == {"loss": 0.5}
        and state["round_number"] == 3
        and state["head_layers"] == []
    )
    second = await client.ok(
        "training.personalized.update",
        params(mlp_model, shifted(base_state, 1.5), metrics={"loss": 0.25}, round_number=4),
        device["token"],
    )
    assert (
        second["created"] is False
        and set(second) == set(first)
        and set(second["state"]) == set(state)
    )
    assert second["state"]["created_at"] == state["created_at"] and second["state"]["metrics"] == {
        "loss": 0.25
    }
    # The replaced object is gone once the new row is in; the new one holds exactly the sent values.
    key = second["state"]["weights_key"]
    assert key != state["weights_key"] and bucket_keys(settings, "personalized/") == [key]
    stored = read_object(settings, key)
    assert hashlib.sha256(stored).hexdigest() == second["state"]["weights_sha256"]
    assert len(stored) == second["state"]["weights_size_bytes"]
    loaded = safetensors.numpy.load(stored)
    expected = {k: v.astype(np.float64) + 1.5 for k, v in base_state.items()}
    assert sorted(loaded) == sorted(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(loaded[name], values, rtol=1e-6)
    assert state_rows(settings) == [(device["device_id"], mlp_model["id"], "", key)]


async def test_torch_files_from_devices_are_refused(
    client, device, mlp_model, base_state, settings
):
    # A torch file is a pickle whose storages are built before any shape can be checked:
    # devices send safetensors (docs/aggregation.md).
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in shifted(base_state, 2.0).items()}, buffer)
    error = await client.error(
        "training.personalized.update",
        {
            **params(mlp_model),
            "weights": {"data": b64(buffer.getvalue())},
            "weights_encoding": "torch",
        },
        device["token"],
    )
    assert error["code"] == 4400 and error["data"]["type"] == "bad_request"
    assert "devices send safetensors" in error["data"]["message"]
    assert bucket_keys(settings, "personalized/") == []


async def test_fedper_stores_exactly_its_head_layers(
    client, device, mlp_model, base_state, settings
):
    head = shifted(base_state, 0.25, HEAD)
    result = await client.ok(
        "training.personalized.update",
        params(mlp_model, head, personalization_type="fedper", head_layers=HEAD),
        device["token"],
    )
    assert result["state"]["head_layers"] == HEAD
    loaded = safetensors.numpy.load(read_object(settings, result["state"]["weights_key"]))
    assert sorted(loaded) == HEAD


@pytest.mark.parametrize(
    "case",
    [
        "extra_tensor",
        "missing_head_tensor",
        "unknown_head_layer",
        "wrong_shape",
        "wrong_dtype",
        "nan",
        "inf",
        "corrupt",
        "torch_pickle_junk",
        "partial_ditto",
    ],
)
async def test_bad_weights_are_refused_and_nothing_is_stored(
    client, device, mlp_model, base_state, settings, case
):
    await client.ok(
        "training.personalized.update", params(mlp_model, shifted(base_state, 1.0)), device["token"]
    )
    before_keys, before_rows = bucket_keys(settings), state_rows(settings)
    fedper = {"personalization_type": "fedper", "head_layers": HEAD}
    head = shifted(base_state, 0.0, HEAD)
    broken_nan = {**base_state, "fc1.bias": np.full(16, np.nan, dtype=np.float32)}
    broken_inf = {**base_state, "fc2.weight": np.full((3, 16), np.inf, dtype=np.float32)}
    cases = {
        "extra_tensor": params(mlp_model, {**head, "fc1.bias": base_state["fc1.bias"]}, **fedper),
        "missing_head_tensor": params(mlp_model, {"fc2.bias": head["fc2.bias"]}, **fedper),
        "unknown_head_layer": params(
            mlp_model, head, personalization_type="fedper", head_layers=[*HEAD, "fc9.w"]
        ),
        "wrong_shape": params(
            mlp_model, {**base_state, "fc1.bias": np.zeros(17, dtype=np.float32)}
        ),
        "wrong_dtype": params(
            mlp_model, {**base_state, "fc1.bias": np.zeros(16, dtype=np.float64)}
        ),
        "nan": params(mlp_model, broken_nan),
        "inf": params(mlp_model, broken_inf),
        "corrupt": {
            **params(mlp_model),
            "weights": {"data": b64(safetensors.numpy.save(base_state)[:40])},
        },
        "torch_pickle_junk": {
            **params(mlp_model),
            "weights": {"data": b64(b"PK\x03\x04not a zip")},
            "weights_encoding": "torch",
        },
        "partial_ditto": params(mlp_model, head),
    }
    error = await client.error("training.personalized.update", cases[case], device["token"])
    assert error["data"]["type"] == "bad_request" and "Traceback" not in error["data"]["message"]
    # Each refusal names the tensor or the field at fault.
    names = {
        "extra_tensor": "unexpected tensor 'fc1.bias'",
        "missing_head_tensor": "missing tensor 'fc2.weight'",
        "unknown_head_layer": "head_layers names tensors",
        "wrong_shape": "shape of 'fc1.bias' is [17], expected [16]",
        "wrong_dtype": "dtype of 'fc1.bias' is float64, expected float32",
        "nan": "'fc1.bias' contains NaN or infinite values",
        "inf": "'fc2.weight' contains NaN or infinite values",
        "corrupt": "weights is not a valid safetensors file",
        "torch_pickle_junk": "devices send safetensors",
        "partial_ditto": "missing tensor 'fc1.weight'",
    }
    assert names[case] in error["data"]["message"], error
    if case == "unknown_head_layer":
        assert error["data"]["field"] == "head_layers"
    assert bucket_keys(settings) == before_keys and state_rows(settings) == before_rows


async def test_weights_key_keeps_only_this_states_own_weights(
    client, org, device, mlp_model, base_state, settings
):
    mine = (
        await client.ok(
            "training.personalized.update",
            params(mlp_model, shifted(base_state, 1.0)),
            device["token"],
        )
    )["state"]
    other = await register_device(client, org.token)
    theirs = (
        await client.ok(
            "training.personalized.update",
            params(mlp_model, shifted(base_state, 2.0)),
            other["token"],
        )
    )["state"]
    kept = await client.ok(
        "training.personalized.update",
        params(mlp_model, weights_key=mine["weights_key"], metrics={"acc": 0.5}),
        device["token"],
    )
    assert kept["created"] is False and kept["state"]["weights_key"] == mine["weights_key"]
    assert kept["state"]["weights_sha256"] == mine["weights_sha256"] and kept["state"][
        "metrics"
    ] == {"acc": 0.5}
    error = await client.error(
        "training.personalized.update",
        params(mlp_model, weights_key=theirs["weights_key"]),
        device["token"],
    )
    assert (
        error["data"]["type"] == "precondition_failed"
        and error["data"]["weights_key"] == mine["weights_key"]
    )
    # A state that does not exist yet has no weights to keep.
    error = await client.error(
        "training.personalized.update",
        params(mlp_model, weights_key=theirs["weights_key"]),
        (await register_device(client, org.token))["token"],
    )
    assert error["data"]["type"] == "precondition_failed" and error["data"]["weights_key"] is None
    # Weights checked as a whole model cannot be kept as a fedper head.
    error = await client.error(
        "training.personalized.update",
        params(
            mlp_model,
            weights_key=mine["weights_key"],
            personalization_type="fedper",
            head_layers=HEAD,
        ),
        device["token"],
    )
    assert error["data"]["type"] == "bad_request" and error["data"]["field"] == "weights_key"
    assert bucket_keys(settings, "personalized/") == sorted(
        [mine["weights_key"], theirs["weights_key"]]
    )


async def test_a_state_without_weights_drops_the_old_object(
    client, device, mlp_model, base_state, settings
):
    await client.ok(
        "training.personalized.update", params(mlp_model, shifted(base_state, 1.0)), device["token"]
    )
    result = await client.ok(
        "training.personalized.update", params(mlp_model, metrics={"loss": 1}), device["token"]
    )
    assert result["state"]["weights_key"] is None and result["state"]["weights_size_bytes"] is None
    assert bucket_keys(settings, "personalized/") == []
    got = await client.ok(
        "training.personalized.get", {"model_id": mlp_model["id"]}, device["token"]
    )
    assert got["has_personalized_weights"] is False and got["state"]["metrics"] == {"loss": 1}


async def test_weights_from_a_presigned_upload(
    client, org, device, mlp_model, base_state, settings
):
    data = safetensors.numpy.save(shifted(base_state, 3.0))

    async def upload(purpose: str) -> str:
        created = await client.ok(
            "uploads.create",
            {
                "purpose": purpose,
                "size_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            },
            device["token"],
        )
        async with aiohttp.ClientSession() as http, http.put(created["url"], data=data) as resp:
            assert resp.status == 200
        return created["upload_id"]

    wrong = await upload("weights")
    error = await client.error(
        "training.personalized.update",
        {**params(mlp_model), "weights": {"upload_id": wrong}},
        device["token"],
    )
    assert error["data"]["type"] == "bad_request" and error["data"]["field"] == "weights"
    assert state_rows(settings) == []
    right = await upload("personalization")
    result = await client.ok(
        "training.personalized.update",
        {**params(mlp_model), "weights": {"upload_id": right}},
        device["token"],
    )
    loaded = safetensors.numpy.load(read_object(settings, result["state"]["weights_key"]))
    np.testing.assert_array_equal(loaded["fc2.bias"], base_state["fc2.bias"] + np.float32(3.0))
    assert [k for k in bucket_keys(settings, "uploads/") if right in k] == []
    again = await client.error(
        "training.personalized.update",
        {**params(mlp_model), "weights": {"upload_id": right}},
        device["token"],
    )
    assert again["data"]["type"] == "conflict"


async def test_update_replays_with_the_same_idempotency_key(
    client, device, mlp_model, base_state, settings
):
    body = params(mlp_model, shifted(base_state, 1.0), idempotency_key="p-1")
    first = await client.ok("training.personalized.update", body, device["token"])
    assert await client.ok("training.personalized.update", body, device["token"]) == first
    changed = await client.error(
        "training.personalized.update", {**body, "metrics": {"loss": 1}}, device["token"]
    )
    assert changed["data"]["type"] == "conflict"
    assert len(bucket_keys(settings, "personalized/")) == 1


async def test_a_model_without_versions_cannot_hold_weights(
    client, org, device, base_state, settings
):
    bare = await client.ok("models.create", {"name": "bare"}, org.token)
    error = await client.error(
        "training.personalized.update", params(bare, base_state), device["token"]
    )
    assert error["data"]["type"] == "precondition_failed"
    assert state_rows(settings) == [] and bucket_keys(settings) == []


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"model_id": None}, "$"),
        ({"personalization_type": "maml"}, "$.personalization_type"),
        ({"round_number": "3"}, "$.round_number"),
        ({"round_number": -1}, "$.round_number"),
        ({"extra": 1}, "$"),
        ({"metrics": {f"m{i}": i for i in range(33)}}, "$.metrics"),
        ({"metrics": {"loss": 1e300}}, "$.metrics[...]"),
        ({"metrics": {"loss": [1]}}, "$.metrics[...]"),
        ({"weights": {"data": "***not base64***"}}, "$.weights.data"),
        ({"weights": {"data": "AAAA"}, "weights_key": "personalized/x"}, "$"),
        ({"personalization_type": "fedper"}, "$"),
        ({"head_layers": ["fc1.bias", "fc1.bias"]}, "$"),
        ({"head_layers": "fc1.bias"}, "$.head_layers"),
        ({"federation_id": "fed_1"}, "$.federation_id"),
    ],
)
async def test_update_validates_params(client, device, mlp_model, settings, change, path):
    body = {k: v for k, v in {**params(mlp_model), **change}.items() if v is not None}
    assert_invalid(await client.error("training.personalized.update", body, device["token"]), path)
    assert state_rows(settings) == []


async def test_overflowing_numbers_are_invalid_params(client, device, mlp_model):
    raw = (
        b'{"jsonrpc":"2.0","method":"training.personalized.update","id":1,"params":{"model_id":"'
        + mlp_model["id"].encode()
        + b'","personalization_type":"ditto","metrics":{"loss":1e999}}}'
    )
    _, answer = await client.post(raw, device["token"], raw=True)
    assert_invalid(answer["error"], "$.metrics[...]")


# --- authorization ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        "training.personalized.update",
        "training.personalized.get",
        "training.personalized.metrics",
        "training.personalized.list",
    ],
)
async def test_personalized_methods_need_a_token(client, method):
    resp, body = await client.post({"jsonrpc": "2.0", "method": method, "params": {}, "id": 1})
    assert resp.status == 401 and body["error"]["data"]["type"] == "unauthorized"


async def test_only_devices_write_and_only_orgs_list(client, org, device, mlp_model):
    error = await client.error("training.personalized.update", params(mlp_model), org.token)
    assert error["data"]["type"] == "forbidden"
    error = await client.error("training.personalized.list", {}, device["token"])
    assert error["data"]["type"] == "forbidden"


async def test_devices_write_only_models_their_org_may_read(
    client, other_org, device, mlp_model, settings
):
    stranger = await register_device(client, other_org.token)
    error = await client.error("training.personalized.update", params(mlp_model), stranger["token"])
    assert error["data"]["type"] == "forbidden"
    error = await client.error(
        "training.personalized.update",
        {**params(mlp_model), "model_id": MODEL_UNKNOWN},
        device["token"],
    )
    assert error["data"]["type"] == "not_found"
    assert state_rows(settings) == []


@pytest.mark.parametrize("method", ["training.personalized.get", "training.personalized.metrics"])
async def test_reading_states(client, org, other_org, device, mlp_model, method):
    await client.ok(
        "training.personalized.update", params(mlp_model, metrics={"acc": 0.9}), device["token"]
    )
    sibling = await register_device(client, org.token)
    query = {"model_id": mlp_model["id"]}
    own = await client.ok(method, query, device["token"])
    by_org = await client.ok(method, {**query, "device_id": device["device_id"]}, org.token)
    assert own == by_org
    error = await client.error(
        method, {**query, "device_id": device["device_id"]}, sibling["token"]
    )
    assert error["data"]["type"] == "forbidden"
    error = await client.error(method, query, org.token)
    assert error["data"]["type"] == "bad_request" and error["data"]["field"] == "device_id"
    error = await client.error(method, {**query, "device_id": device["device_id"]}, other_org.token)
    assert error["data"]["type"] == "forbidden"
    error = await client.error(method, {**query, "device_id": DEVICE_UNKNOWN}, org.token)
    assert error["data"]["type"] == "not_found"
    error = await client.error(method, {"model_id": MODEL_UNKNOWN}, device["token"])
    assert error["data"]["type"] == "not_found"
    assert_invalid(await client.error(method, {**query, "limit": 5}, device["token"]), "$")


async def test_get_returns_the_state_and_a_working_download_link(
    client, device, mlp_model, base_state
):
    empty = await client.ok(
        "training.personalized.get", {"model_id": mlp_model["id"]}, device["token"]
    )
    assert empty == {"state": None, "has_personalized_weights": False}
    sent = shifted(base_state, 0.75)
    await client.ok(
        "training.personalized.update", params(mlp_model, sent, round_number=2), device["token"]
    )
    got = await client.ok(
        "training.personalized.get", {"model_id": mlp_model["id"]}, device["token"]
    )
    assert got["has_personalized_weights"] is True and got["state"]["round_number"] == 2
    async with aiohttp.ClientSession() as http, http.get(got["weights_url"]) as resp:
        assert resp.status == 200
        data = await resp.read()
    assert hashlib.sha256(data).hexdigest() == got["state"]["weights_sha256"]
    np.testing.assert_array_equal(safetensors.numpy.load(data)["fc1.weight"], sent["fc1.weight"])


async def test_metrics_are_the_metrics_subset(client, device, mlp_model):
    missing = await client.ok(
        "training.personalized.metrics", {"model_id": mlp_model["id"]}, device["token"]
    )
    assert (
        missing["metrics"] is None
        and missing["updated_at"] is None
        and missing["device_id"] == device["device_id"]
    )
    await client.ok(
        "training.personalized.update",
        params(mlp_model, metrics={"loss": 0.125, "steps": 40}, round_number=7),
        device["token"],
    )
    found = await client.ok(
        "training.personalized.metrics", {"model_id": mlp_model["id"]}, device["token"]
    )
    assert found["metrics"] == {"loss": 0.125, "steps": 40} and found["round_number"] == 7
    assert found["personalization_type"] == "ditto" and "weights_key" not in found


async def test_federation_states_are_read_by_their_own_organization_only(
    client, org, other_org, make_org, mlp_model, federation, base_state
):
    theirs = await register_device(client, other_org.token)
    fed = {"federation_id": federation["id"]}
    await client.ok(
        "training.personalized.update",
        params(mlp_model, shifted(base_state, 1.0), metrics={"acc": 0.5}, **fed),
        theirs["token"],
    )
    local = await client.ok(
        "training.personalized.get", {"model_id": mlp_model["id"]}, theirs["token"]
    )
    assert local["state"] is None
    query = {"model_id": mlp_model["id"], "device_id": theirs["device_id"], **fed}
    own = await client.ok("training.personalized.get", query, other_org.token)
    assert (
        own["weights_url"].startswith("http") and own["state"]["federation_id"] == federation["id"]
    )
    # The federation's owner is another organization: it sees neither the state nor its metrics.
    for method in ("training.personalized.get", "training.personalized.metrics"):
        error = await client.error(method, query, org.token)
        assert error["data"]["type"] == "forbidden"
        assert theirs["device_id"] not in str(error["data"]) and "acc" not in str(error["data"])
    outsider = await make_org("outsider")
    assert (await client.error("training.personalized.get", query, outsider.token))["data"][
        "type"
    ] == "forbidden"
    assert (await client.error("training.personalized.list", fed, outsider.token))["data"][
        "type"
    ] == "forbidden"
    error = await client.error(
        "training.personalized.get", {**query, "federation_id": FEDERATION_UNKNOWN}, other_org.token
    )
    assert error["data"]["type"] == "not_found"


async def test_devices_write_federation_states_only_where_their_org_is_a_member(
    client, org, other_org, make_org, mlp_model, federation, settings
):
    outsider = await make_org("outsider")
    stranger = await register_device(client, outsider.token)
    error = await client.error(
        "training.personalized.update",
        params(mlp_model, federation_id=federation["id"]),
        stranger["token"],
    )
    assert error["data"]["type"] == "forbidden"
    # A model other_org may read through another federation is still not part of this one.
    elsewhere = await client.ok("models.create", {"name": "elsewhere"}, org.token)
    second = await shared_federation(client, org, other_org, elsewhere, "g")
    member = await register_device(client, other_org.token)
    error = await client.error(
        "training.personalized.update",
        params(elsewhere, federation_id=federation["id"]),
        member["token"],
    )
    assert error["data"]["type"] == "forbidden"
    await client.ok(
        "training.personalized.update",
        params(elsewhere, federation_id=second["id"]),
        member["token"],
    )
    assert [row[2] for row in state_rows(settings)] == [second["id"]]


async def test_list_gives_the_latest_state_per_device(
    client, org, other_org, mlp_model, mlp_bundle, federation
):
    second_model = await client.ok("models.create", {"name": "mlp2"}, org.token)
    await client.ok(
        "federations.models.share",
        {"federation_id": federation["id"], "model_id": second_model["id"]},
        org.token,
    )
    fed = {"federation_id": federation["id"]}
    mine = await register_device(client, org.token)
    theirs = await register_device(client, other_org.token)
    await client.ok(
        "training.personalized.update", params(mlp_model, round_number=1, **fed), mine["token"]
    )
    await client.ok(
        "training.personalized.update", params(mlp_model, round_number=1, **fed), theirs["token"]
    )
    await client.ok(
        "training.personalized.update", params(second_model, round_number=2, **fed), mine["token"]
    )
    await client.ok(
        "training.personalized.update", params(mlp_model, round_number=9), mine["token"]
    )
    listed = await client.ok("training.personalized.list", fed, org.token)
    # Own devices only, latest state per device; the other member as a count.
    assert listed["total"] == 1
    assert [(s["device_id"], s["model_id"]) for s in listed["items"]] == [
        (mine["device_id"], second_model["id"])
    ]
    both = sorted(
        [{"org_id": org.id, "devices": 1}, {"org_id": other_org.id, "devices": 1}],
        key=lambda c: c["org_id"],
    )
    assert listed["participation"] == both
    theirs_listed = await client.ok("training.personalized.list", fed, other_org.token)
    assert [(s["device_id"], s["model_id"]) for s in theirs_listed["items"]] == [
        (theirs["device_id"], mlp_model["id"])
    ]
    assert theirs_listed["participation"] == both
    by_model = await client.ok(
        "training.personalized.list", {**fed, "model_id": mlp_model["id"]}, org.token
    )
    assert by_model["total"] == 1 and {s["round_number"] for s in by_model["items"]} == {1}
    assert by_model["participation"] == both
    second = await register_device(client, org.token)
    await client.ok(
        "training.personalized.update", params(mlp_model, round_number=5, **fed), second["token"]
    )
    page = await client.ok(
        "training.personalized.list", {**fed, "limit": 1, "offset": 1}, org.token
    )
    assert page["total"] == 2 and [s["device_id"] for s in page["items"]] == [mine["device_id"]]
    own = await client.ok("training.personalized.list", {}, org.token)
    assert own["total"] == 1 and own["items"][0]["round_number"] == 9
    # Outside a federation only the caller's own devices are counted.
    assert own["participation"] == [{"org_id": org.id, "devices": 1}]
    other = await client.ok("training.personalized.list", {}, other_org.token)
    assert other["participation"] == []
    assert other["total"] == 0
    assert_invalid(
        await client.error("training.personalized.list", {"limit": 501}, org.token), "$.limit"
    )


async def test_a_row_that_cannot_be_written_leaves_no_object_behind(
    client, device, mlp_model, base_state, settings, monkeypatch
):
    from fedrpc.app import SERVICES
    from fedrpc.db import Query

    await client.ok(
        "training.personalized.update", params(mlp_model, shifted(base_state, 1.0)), device["token"]
    )
    before_keys, before_rows = bucket_keys(settings), state_rows(settings)
    name = "training.personalized.upsert_state"
    monkeypatch.setitem(client.app[SERVICES].db.queries, name, Query(name, "fails", "SELECT 1 / 0"))
    error = await client.error(
        "training.personalized.update", params(mlp_model, shifted(base_state, 2.0)), device["token"]
    )
    assert error["code"] == -32603 and error["data"]["type"] == "internal_error"
    assert bucket_keys(settings) == before_keys and state_rows(settings) == before_rows
