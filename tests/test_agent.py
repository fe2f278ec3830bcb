"""DeviceAgent and create_from_module against the real server over HTTP.

Each test drives a real round of the digits network through the agent; what the
agent claims (weights checked, update clipped, job recorded, payload presigned,
state kept) is read back from the server, Postgres or the published version,
and the numbers are checked against numpy float64.
"""

from __future__ import annotations

import datetime as dt
import stat

import msgspec
import numpy as np
import psycopg
import pytest
import safetensors.numpy
import torch

from fedrpc.client import Client, DeviceAgent, LocalResult, LocalTask
from fedrpc.sim import digits
from tests.conftest import DEVICE_DEFAULTS

STEP = 0.05  # each trained weight moves by this much in `shift`


def url_of(client) -> str:
    return str(client.http.make_url("/rpc"))


def shift(task: LocalTask) -> LocalResult:
    """A deterministic 'training': every parameter moves by STEP (a delta of norm STEP·√2410)."""
    with torch.no_grad():
        for p in task.module.parameters():
            p.add_(STEP)
    return LocalResult(7, {"loss": 0.5})


def agent(client, train=shift, **options) -> DeviceAgent:
    return DeviceAgent(url_of(client), module_factory=digits.make_net, train=train, **options)


async def digits_model(client, org, **client_options) -> str:
    async with Client(url_of(client), org.token, **client_options) as sdk:
        model = await sdk.models.create(name="digits")
        await sdk.models.versions.create_from_module(
            model_id=model.id, module=digits.make_net(3), example_input=torch.zeros(2, 64)
        )
    return model.id


async def running_round(client, org, model_id: str, devices: int = 1, **params) -> dict:
    rnd = await client.ok(
        "training.create_round",
        {"model_id": model_id, "base_version": 1, "target_device_count": devices, **params},
        org.token,
    )
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    return rnd


def base_state() -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in digits.make_net(3).state_dict().items()}


async def version_state(client, org, model_id: str, version: int) -> dict[str, np.ndarray]:
    async with Client(url_of(client), org.token) as sdk:
        links = await sdk.models.versions.download(
            model_id=model_id, version=version, kinds=["safetensors"]
        )
        return safetensors.numpy.load(await sdk.get(links.artifacts[0].url))


async def test_create_from_module_registers_a_version_the_server_checked(client, org):
    model_id = await digits_model(client, org)

    version = await client.ok(
        "models.versions.get", {"model_id": model_id, "version": 1}, org.token
    )
    assert {a["kind"] for a in version["artifacts"]} >= {"safetensors", "onnx", "program"}
    assert version["input_shape"] == [None, 64]
    stored = await version_state(client, org, model_id, 1)
    for name, value in base_state().items():
        assert np.array_equal(stored[name], value.astype(np.float32)), name


async def test_large_artifacts_go_through_presigned_uploads(client, org, database_url):
    model_id = await digits_model(client, org, inline_max_bytes=1000)

    with psycopg.connect(database_url) as conn:
        purposes = conn.execute(
            "SELECT purpose, consumed_at IS NOT NULL FROM uploads WHERE org_id = %s", (org.id,)
        ).fetchall()
    # The state dict (9.7 KB), ONNX graph and program all exceed 1,000 bytes.
    assert sorted(purposes) == [("model_artifact", True)] * 3
    assert model_id


async def test_create_from_module_refuses_an_example_without_a_batch(client, org):
    async with Client(url_of(client), org.token) as sdk:
        model = await sdk.models.create(name="digits")
        with pytest.raises(ValueError, match="batch"):
            await sdk.models.versions.create_from_module(
                model_id=model.id, module=digits.make_net(), example_input=torch.zeros(1, 64)
            )


async def test_a_round_trains_uploads_and_records_its_job(client, org, database_url):
    model_id = await digits_model(client, org)
    device = agent(client, report_jobs=True)
    await device.register(org.token, **DEVICE_DEFAULTS)
    rnd = await running_round(client, org, model_id)

    (outcome,) = await device.run_once()
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    again = await device.run_once()  # the round is done: nothing is taken twice
    await device.close()

    assert outcome.status == "uploaded" and outcome.sent and outcome.sample_count == 7
    assert again == []
    stored = await version_state(client, org, model_id, version["version"])
    for name, value in base_state().items():  # FedAvg of one update: base + STEP everywhere
        assert np.allclose(stored[name], value + STEP, atol=1e-6), name
    with psycopg.connect(database_url) as conn:
        job = conn.execute(
            "SELECT state, progress, metrics FROM device_jobs WHERE round_id = %s", (rnd["id"],)
        ).fetchone()
    assert job == ("completed", {"loss": 0.5}, {"loss": 0.5})


async def test_an_update_above_the_offers_bound_is_clipped_before_it_is_sent(client, org):
    model_id = await digits_model(client, org)
    device = agent(client)
    await device.register(org.token, **DEVICE_DEFAULTS)
    bound = 0.3  # the shift's norm is 0.05·√2410 ≈ 2.45
    rnd = await running_round(client, org, model_id, max_update_norm=bound)

    (outcome,) = await device.run_once()
    version = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
    await device.close()

    assert outcome.status == "uploaded" and outcome.clipped
    stored = await version_state(client, org, model_id, version["version"])
    base = base_state()
    delta = np.concatenate([(stored[k] - base[k]).ravel() for k in base])
    assert np.linalg.norm(delta) == pytest.approx(bound, rel=1e-4)
    expected = STEP * bound / (STEP * np.sqrt(delta.size))  # every entry scaled alike
    assert np.allclose(delta, expected, atol=1e-6)


async def test_the_fedprox_term_is_mu_over_two_times_the_squared_distance(client, org):
    model_id = await digits_model(client, org)
    seen = {}

    def train(task: LocalTask) -> LocalResult:
        shift(task)
        seen["term"] = float(task.proximal_term(task.module).detach())
        seen["mu"] = task.proximal_mu
        return LocalResult(3)

    device = agent(client, train=train)
    await device.register(org.token, **DEVICE_DEFAULTS)
    await running_round(client, org, model_id, client_config={"proximal_mu": 0.4})
    (outcome,) = await device.run_once()
    await device.close()

    size = sum(v.size for v in base_state().values())
    assert outcome.status == "uploaded" and seen["mu"] == 0.4
    assert seen["term"] == pytest.approx(0.4 / 2 * size * STEP**2, rel=1e-5)


async def test_base_weights_that_do_not_match_the_offer_are_refused(client, org):
    model_id = await digits_model(client, org)
    device = agent(client)
    await device.register(org.token, **DEVICE_DEFAULTS)
    rnd = await running_round(client, org, model_id)
    (offer,) = (await device.sync()).desired_state.round_offers
    forged = msgspec.structs.replace(offer, weights_sha256="0" * 64)

    outcome = await device.take_part(forged)
    await device.close()

    assert outcome.status == "failed" and outcome.error == "bad_request" and not outcome.sent
    progress = await client.ok("training.get_round_progress", {"round_id": rnd["id"]}, org.token)
    assert progress["received_count"] == 0


async def test_a_cancelled_round_fails_the_device_with_the_servers_type(client, org):
    model_id = await digits_model(client, org)
    rnd = {}

    async def train(task: LocalTask) -> LocalResult:
        await client.ok(
            "training.cancel_round", {"round_id": rnd["id"], "reason": "operator"}, org.token
        )
        return shift(task)

    device = agent(client, train=train)
    await device.register(org.token, **DEVICE_DEFAULTS)
    rnd.update(await running_round(client, org, model_id))
    (outcome,) = await device.run_once()
    again = await device.run_once()  # the next sync names the round as stopped
    await device.close()

    assert outcome.status == "failed" and outcome.error in {"precondition_failed", "conflict"}
    assert again == [] and device.outcomes[rnd["id"]].status == "failed"


async def test_register_stores_the_token_and_a_new_agent_resumes_with_it(client, org, tmp_path):
    path = tmp_path / "device" / "token"
    first = agent(client, token_path=path)
    token = await first.register(org.token, **DEVICE_DEFAULTS)
    device_id = first.device_id
    await first.close()

    assert path.read_text() == token and stat.S_IMODE(path.stat().st_mode) == 0o600
    second = agent(client, token_path=path)
    result = await second.sync(battery_pct=50)
    await second.close()
    assert result.device_id == device_id


async def test_observations_and_personalized_state_round_trip(client, org):
    model_id = await digits_model(client, org)
    device = agent(client, inline_max_bytes=1000)  # the state goes through an upload
    await device.register(org.token, **DEVICE_DEFAULTS)
    now = dt.datetime.now(dt.UTC).isoformat()

    accepted = await device.report(
        [
            {"variable": "steps", "value": 1234.0, "recorded_at": now},
            {"variable": "mood", "category": "ok", "recorded_at": now},
        ]
    )
    assert await device.load_personalized(model_id) is None
    head = {k: v + 1 for k, v in digits.make_net(3).state_dict().items()}
    saved = await device.save_personalized(model_id, head, metrics={"accuracy": 0.9})
    loaded = await device.load_personalized(model_id)
    await device.close()

    assert accepted == 2 and saved.created
    assert set(loaded) == set(head)
    for name, value in head.items():
        assert np.array_equal(loaded[name], value.numpy()), name
