"""models.* and models.versions.*: registration, validation, storage, download."""

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
from tests.methods.conftest import inline


def bucket_keys(settings, prefix: str = "") -> list[str]:
    s3 = Minio(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, secure=False)
    return [
        o.object_name for o in s3.list_objects(settings.s3_bucket, prefix=prefix, recursive=True)
    ]


@pytest.fixture
async def model(client, org) -> dict:
    return await client.ok(
        "models.create", {"name": "keyboard", "use_case": "next-word"}, org.token
    )


async def test_create_list_get_models(client, org, other_org):
    created = await client.ok("models.create", {"name": "m1", "description": "first"}, org.token)
    await client.ok("models.create", {"name": "m2"}, org.token)
    await client.ok("models.create", {"name": "m1"}, other_org.token)
    assert created["id"].startswith("mdl_") and created["framework"] == "pytorch"
    listed = await client.ok("models.list", {"limit": 1}, org.token)
    assert listed["total"] == 2 and len(listed["items"]) == 1 and listed["items"][0]["name"] == "m2"
    got = await client.ok("models.get", {"model_id": created["id"]}, org.token)
    assert got == created


async def test_model_names_are_unique_per_org(client, org):
    await client.ok("models.create", {"name": "dup"}, org.token)
    assert (await client.error("models.create", {"name": "dup"}, org.token))["data"][
        "type"
    ] == "conflict"


async def test_models_of_another_org_are_forbidden(client, org, other_org, model):
    assert (await client.error("models.get", {"model_id": model["id"]}, other_org.token))["data"][
        "type"
    ] == "forbidden"
    error = await client.error("models.versions.list", {"model_id": model["id"]}, other_org.token)
    assert error["data"]["type"] == "forbidden"


async def test_unknown_model_is_not_found(client, org):
    error = await client.error("models.get", {"model_id": "mdl_" + "a" * 32}, org.token)
    assert error["data"]["type"] == "not_found"


async def test_model_params_are_validated(client, org):
    for params in (
        {},
        {"name": ""},
        {"name": "x", "framework": "tensorflow"},
        {"name": "x", "description": "d" * 513},
    ):
        assert (await client.error("models.create", params, org.token))["code"] == -32602


@pytest.mark.parametrize("bundle_name", ["mlp_bundle", "convbn_bundle"])
async def test_register_version_stores_four_verified_artifacts(
    client, org, model, settings, bundle_name, request
):
    net, bundle = request.getfixturevalue(bundle_name)
    version = await client.ok(
        "models.versions.create", {"model_id": model["id"], **inline(bundle)}, org.token
    )
    expected = {
        n: (list(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in net.state_dict().items()
    }
    assert version["version"] == 1
    assert {m["name"]: (m["shape"], m["dtype"]) for m in version["manifest"]} == expected
    assert version["input_shape"] == [None, *net.input_shape]
    assert sorted(a["kind"] for a in version["artifacts"]) == [
        "onnx",
        "program",
        "safetensors",
        "torch",
    ]

    links = await client.ok("models.versions.download", {"model_id": model["id"]}, org.token)
    async with aiohttp.ClientSession() as http:
        blobs = {}
        for link in links["artifacts"]:
            async with http.get(link["url"]) as resp:
                assert resp.status == 200
                blobs[link["kind"]] = await resp.read()
            assert hashlib.sha256(blobs[link["kind"]]).hexdigest() == link["sha256"]
    assert blobs["onnx"] == bundle["onnx"] and blobs["program"] == bundle["program"]
    stored = safetensors.numpy.load(blobs["safetensors"])
    loaded = torch.load(io.BytesIO(blobs["torch"]), weights_only=True)
    for name, tensor in net.state_dict().items():
        np.testing.assert_array_equal(stored[name], tensor.numpy())
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


async def test_versions_are_numbered_and_listed_newest_first(client, org, model, mlp_bundle):
    _, bundle = mlp_bundle
    for _ in range(2):
        await client.ok(
            "models.versions.create", {"model_id": model["id"], **inline(bundle)}, org.token
        )
    listed = await client.ok("models.versions.list", {"model_id": model["id"]}, org.token)
    assert [v["version"] for v in listed["items"]] == [2, 1] and listed["total"] == 2
    assert (await client.ok("models.versions.get", {"model_id": model["id"]}, org.token))[
        "version"
    ] == 2
    assert (await client.ok("models.get", {"model_id": model["id"]}, org.token))[
        "latest_version"
    ] == 2
    error = await client.error(
        "models.versions.get", {"model_id": model["id"], "version": 9}, org.token
    )
    assert error["data"]["type"] == "not_found"


@pytest.mark.parametrize("broken", ["onnx", "program", "weights", "other_weights", "swapped_onnx"])
async def test_bad_artifacts_are_refused_and_nothing_is_stored(
    client, org, model, settings, mlp_bundle, convbn_bundle, broken
):
    _, bundle = mlp_bundle
    _, other = convbn_bundle
    override = {
        "onnx": {"onnx": b"\x08\x07garbage"},
        "program": {"program": b"PK\x03\x04 not really a zip"},
        "weights": {"weights": bundle["weights"][:50]},
        "other_weights": {"weights": other["weights"]},
        "swapped_onnx": {"onnx": other["onnx"]},
    }[broken]
    error = await client.error(
        "models.versions.create", {"model_id": model["id"], **inline(bundle, **override)}, org.token
    )
    assert error["data"]["type"] == "bad_request"
    assert "Traceback" not in error["data"]["message"]
    assert (await client.ok("models.versions.list", {"model_id": model["id"]}, org.token))[
        "total"
    ] == 0
    assert bucket_keys(settings, "models/") == []


async def test_malformed_base64_is_invalid_params(client, org, model, mlp_bundle):
    params = {"model_id": model["id"], **inline(mlp_bundle[1])}
    params["onnx"] = {"data": "***not base64***"}
    error = await client.error("models.versions.create", params, org.token)
    assert error["code"] == -32602 and error["data"]["path"] == "$.onnx.data"


async def test_payload_needs_exactly_one_source(client, org, model, mlp_bundle):
    params = {"model_id": model["id"], **inline(mlp_bundle[1])}
    params["onnx"] = {}
    assert (await client.error("models.versions.create", params, org.token))["data"][
        "type"
    ] == "bad_request"


async def test_devices_cannot_register_versions(client, org, model, mlp_bundle):
    device = await register_device(client, org.token)
    error = await client.error(
        "models.versions.create",
        {"model_id": model["id"], **inline(mlp_bundle[1])},
        device["token"],
    )
    assert error["data"]["type"] == "forbidden"


async def _upload(client, token, data: bytes, declared: bytes | None = None) -> str:
    created = await client.ok(
        "uploads.create",
        {
            "purpose": "model_artifact",
            "size_bytes": len(declared or data),
            "sha256": hashlib.sha256(declared or data).hexdigest(),
        },
        token,
    )
    async with aiohttp.ClientSession() as http, http.put(created["url"], data=data) as resp:
        assert resp.status == 200
    return created["upload_id"]


async def test_register_version_from_presigned_uploads(client, org, model, settings, mlp_bundle):
    _, bundle = mlp_bundle
    ids = {kind: await _upload(client, org.token, data) for kind, data in bundle.items()}
    params = {"model_id": model["id"], **{k: {"upload_id": v} for k, v in ids.items()}}
    version = await client.ok("models.versions.create", params, org.token)
    weights = next(a for a in version["artifacts"] if a["kind"] == "safetensors")
    assert weights["size_bytes"] > 0
    assert bucket_keys(settings, "uploads/") == []
    again = await client.error("models.versions.create", params, org.token)
    assert again["data"]["type"] == "conflict"


async def test_upload_with_wrong_digest_is_refused_and_released(
    client, org, model, settings, mlp_bundle
):
    _, bundle = mlp_bundle
    tampered = bytearray(bundle["onnx"])
    tampered[-1] ^= 0xFF
    ids = {
        "weights": await _upload(client, org.token, bundle["weights"]),
        "onnx": await _upload(client, org.token, bytes(tampered), declared=bundle["onnx"]),
        "program": await _upload(client, org.token, bundle["program"]),
    }
    params = {"model_id": model["id"], **{k: {"upload_id": v} for k, v in ids.items()}}
    error = await client.error("models.versions.create", params, org.token)
    assert error["data"]["type"] == "bad_request" and error["data"]["field"] == "onnx"
    assert (await client.ok("models.versions.list", {"model_id": model["id"]}, org.token))[
        "total"
    ] == 0
    params["onnx"] = {"upload_id": await _upload(client, org.token, bundle["onnx"])}
    assert (await client.ok("models.versions.create", params, org.token))["version"] == 1


async def test_upload_that_never_arrived_is_a_precondition_failure(client, org, model, mlp_bundle):
    created = await client.ok(
        "uploads.create",
        {"purpose": "model_artifact", "size_bytes": 10, "sha256": "0" * 64},
        org.token,
    )
    params = {"model_id": model["id"], **inline(mlp_bundle[1])}
    params["onnx"] = {"upload_id": created["upload_id"]}
    error = await client.error("models.versions.create", params, org.token)
    assert error["data"]["type"] == "precondition_failed"


async def test_uploads_of_another_org_are_forbidden(client, org, other_org, model, mlp_bundle):
    theirs = await _upload(client, other_org.token, mlp_bundle[1]["onnx"])
    params = {"model_id": model["id"], **inline(mlp_bundle[1])}
    params["onnx"] = {"upload_id": theirs}
    assert (await client.error("models.versions.create", params, org.token))["data"][
        "type"
    ] == "forbidden"


async def test_upload_size_is_bounded(client, org, settings):
    error = await client.error(
        "uploads.create",
        {"purpose": "weights", "size_bytes": settings.max_upload_bytes + 1, "sha256": "0" * 64},
        org.token,
    )
    assert error["data"]["type"] == "bad_request"


def make_draft(database_url: str, model_id: str, version: int = 1) -> None:
    """Arrange a draft directly (training.aggregate {publish: false} makes them in test_aggregate)."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE model_versions SET published = false WHERE model_id = %s AND version = %s",
            (model_id, version),
        )


async def test_publish_makes_a_draft_public_and_replays_and_repeats_unchanged(
    client, org, mlp_model, database_url
):
    make_draft(database_url, mlp_model["id"])
    key = {"model_id": mlp_model["id"], "version": 1}
    draft = await client.ok("models.versions.get", key, org.token)
    assert draft["published"] is False
    params = {**key, "idempotency_key": "publish-1"}
    first = await client.ok("models.versions.publish", params, org.token)
    assert first == {**draft, "published": True}
    assert await client.ok("models.versions.publish", params, org.token) == first
    assert await client.ok("models.versions.publish", key, org.token) == first
    assert await client.ok("models.versions.get", key, org.token) == first
    error = await client.error("models.versions.publish", {**params, "version": 2}, org.token)
    assert error["data"]["type"] == "conflict"


async def test_only_the_owning_org_publishes(client, org, other_org, mlp_model, database_url):
    make_draft(database_url, mlp_model["id"])
    key = {"model_id": mlp_model["id"], "version": 1}
    device = await register_device(client, org.token)
    for token in (other_org.token, device["token"]):
        error = await client.error("models.versions.publish", key, token)
        assert error["data"]["type"] == "forbidden"
    assert (await client.ok("models.versions.get", key, org.token))["published"] is False


async def test_publishing_an_unknown_version_or_model_is_not_found(client, org, mlp_model):
    for params in (
        {"model_id": mlp_model["id"], "version": 2},
        {"model_id": "mdl_" + "a" * 32, "version": 1},
    ):
        error = await client.error("models.versions.publish", params, org.token)
        assert error["data"]["type"] == "not_found"


@pytest.mark.parametrize(
    ("params", "path"),
    [({"version": "1"}, "$.version"), ({"version": 0}, "$.version"), ({"published": True}, "$")],
)
async def test_publish_params_are_validated(client, org, mlp_model, params, path):
    error = await client.error(
        "models.versions.publish", {"model_id": mlp_model["id"], "version": 1, **params}, org.token
    )
    assert error["code"] == -32602 and error["data"]["path"] == path, error
