"""Model fixtures shared by the method tests: real networks, real exported artifacts."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import safetensors.numpy

from tests.kernels.nets import make_net, numpy_state, onnx_bytes, program_bytes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bundle(kind: str, seed: int):
    net = make_net(kind, seed=seed)
    state: dict[str, np.ndarray] = numpy_state(net)
    return net, {
        "weights": safetensors.numpy.save(state),
        "onnx": onnx_bytes(net),
        "program": program_bytes(net),
    }


@pytest.fixture(scope="session")
def mlp_bundle():
    return _bundle("mlp", 1)


@pytest.fixture(scope="session")
def convbn_bundle():
    return _bundle("convbn", 2)


@pytest.fixture(scope="session")
def wide_bundle():
    return _bundle("wide", 3)


def inline(bundle: dict[str, bytes], **override) -> dict:
    parts = {**bundle, **override}
    return {
        "weights": {"data": b64(parts["weights"])},
        "onnx": {"data": b64(parts["onnx"])},
        "program": {"data": b64(parts["program"])},
    }


@pytest.fixture
async def mlp_model(client, org, mlp_bundle) -> dict:
    """A model of `org` with version 1 registered from the MLP bundle."""
    model = await client.ok("models.create", {"name": "mlp"}, org.token)
    await client.ok(
        "models.versions.create", {"model_id": model["id"], **inline(mlp_bundle[1])}, org.token
    )
    return model


@pytest.fixture
async def wide_model(client, org, wide_bundle) -> dict:
    """A model of `org` with version 1 registered from the 100,806-parameter bundle."""
    model = await client.ok("models.create", {"name": "wide"}, org.token)
    await client.ok(
        "models.versions.create", {"model_id": model["id"], **inline(wide_bundle[1])}, org.token
    )
    return model


async def shared_federation(
    client, owner, member, model: dict, name: str = "f", min_round_updates: int = 2, **create
) -> dict:
    """A federation of `owner` with `model` shared into it and `member` an active member.

    Its rounds' results mix at least `min_round_updates` updates (the server's default is 10;
    tests that are not about that rule use the floor, 2); `create` adds federations.create
    params (a privacy_policy)."""
    fed = await client.ok(
        "federations.create",
        {"name": name, "org_id": owner.id, "min_round_updates": min_round_updates, **create},
        owner.token,
    )
    await client.ok(
        "federations.models.share",
        {"federation_id": fed["id"], "model_id": model["id"]},
        owner.token,
    )
    await client.ok(
        "federations.invite", {"federation_id": fed["id"], "org_ids": [member.id]}, owner.token
    )
    await client.ok(
        "federations.join", {"federation_id": fed["id"], "org_id": member.id}, member.token
    )
    return fed


async def upload_delta(
    client, rnd: dict, token: str, delta: dict, sample_count: int = 10, metrics=None
) -> dict:
    """A device's `delta` (name -> array) uploaded inline to the running round `rnd`."""
    params = {
        "round_id": rnd["id"],
        "model_id": rnd["model_id"],
        "version": rnd["base_version"],
        "sample_count": sample_count,
        "update_format": "delta",
        "weights": {"data": b64(safetensors.numpy.save(delta))},
    }
    if metrics is not None:
        params["metrics"] = metrics
    return await client.ok("training.weights.upload", params, token)
