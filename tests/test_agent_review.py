"""Attacks on DeviceAgent / Client / SecAggDevice found by a hostile review; each failed before
its fix.

The server is untrusted from the device's side: several tests tamper an offer from the real
server (msgspec.structs.replace, as tests/test_agent.py does) or run a tiny aiohttp server
that plays a hostile peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time

import msgspec
import numpy as np
import psycopg
import pytest
import safetensors.torch
import torch
from aiohttp import web

from fedrpc.app import create_app
from fedrpc.client import Client, DeviceAgent, LocalResult, LocalTask
from fedrpc.client.secagg import SecAggDevice
from fedrpc.fl import InvalidInput
from fedrpc.fl import secagg as fl_secagg
from fedrpc.sim import digits
from tests.conftest import DEVICE_DEFAULTS, RpcClient
from tests.test_agent import agent, digits_model, running_round, shift, url_of


async def _offer(client, org, device: DeviceAgent, **round_params):
    model_id = await digits_model(client, org)
    await device.register(org.token, **DEVICE_DEFAULTS)
    rnd = await running_round(client, org, model_id, **round_params)
    (offer,) = (await device.sync()).desired_state.round_offers
    return rnd, offer


async def _serve(aiohttp_server, handler) -> str:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/blob"))


# -- token file --------------------------------------------------------------------------------


async def test_register_over_an_existing_token_file_leaves_it_0600(client, org, tmp_path):
    """os.open(..., O_CREAT | O_TRUNC, 0o600) applies the mode only when it creates the file:
    re-registering over an old world-readable token file writes the new token into it."""
    path = tmp_path / "token"
    path.write_text("")  # e.g. left by an older app version / a `touch`
    os.chmod(path, 0o644)
    device = agent(client, token_path=path)
    token = await device.register(org.token, **DEVICE_DEFAULTS)
    await device.close()

    assert path.read_text() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)


# -- hostile offers: downloads -----------------------------------------------------------------


async def test_a_base_weights_download_larger_than_the_offer_is_cut_off(
    client, org, aiohttp_server
):
    """The agent reads the whole body before comparing its size with weights_size_bytes:
    a hostile weights_url can make the device download (and hold in memory) any amount."""
    total, chunk = 64 << 20, b"\0" * (1 << 20)
    written = {"bytes": 0}

    async def huge(request):
        resp = web.StreamResponse()
        resp.content_length = total
        await resp.prepare(request)
        try:
            for _ in range(total // len(chunk)):
                await resp.write(chunk)
                written["bytes"] += len(chunk)
        except (ConnectionResetError, ConnectionError):
            pass
        return resp

    url = await _serve(aiohttp_server, huge)
    device = agent(client, report_jobs=False)
    _, offer = await _offer(client, org, device)
    hostile = msgspec.structs.replace(offer, weights_url=url)

    outcome = await device.take_part(hostile)
    await device.close()

    assert outcome.status == "failed"
    # The offer promised ~10 KB; socket buffers allow a few MB of slack, not 64 MB.
    assert written["bytes"] < 16 << 20, f"the device read {written['bytes'] >> 20} MB"


def _state_bytes(kind: str) -> bytes:
    state = {k: v.clone() for k, v in digits.make_net(3).state_dict().items()}
    if kind == "extra_tensor":
        state["evil"] = torch.zeros(3)
    elif kind == "wrong_shape":
        state["0.weight"] = torch.zeros(32, 65)
    else:  # not safetensors at all, yet the hostile offer's sha256 matches it
        return b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\0" * 64
    return safetensors.torch.save(state)


@pytest.mark.parametrize("kind", ["extra_tensor", "wrong_shape", "not_safetensors"])
async def test_hostile_base_weights_fail_the_round_instead_of_crashing_the_agent(
    client, org, aiohttp_server, kind
):
    """take_part promises an outcome; load_state_dict raises RuntimeError and safetensors
    raises SafetensorError, neither is caught: the exception escapes run_once/run, the round
    is never recorded (re-downloaded at every sync) and the device job stays 'downloading'."""
    data = _state_bytes(kind)

    async def serve(request):
        return web.Response(body=data)

    url = await _serve(aiohttp_server, serve)
    device = agent(client, report_jobs=False)
    _, offer = await _offer(client, org, device)
    hostile = msgspec.structs.replace(
        offer,
        weights_url=url,
        weights_sha256=hashlib.sha256(data).hexdigest(),
        weights_size_bytes=len(data),
    )
    try:
        outcome = await device.take_part(hostile)
    finally:
        await device.close()
    assert outcome.status == "failed" and not outcome.sent


async def test_an_unreachable_weights_url_fails_the_round_instead_of_crashing_the_agent(
    client, org
):
    """Connection errors left after the retries escape take_part as aiohttp exceptions."""
    device = agent(client, report_jobs=False, retries=0)
    _, offer = await _offer(client, org, device)
    hostile = msgspec.structs.replace(offer, weights_url="http://127.0.0.1:9/nothing")
    try:
        outcome = await device.take_part(hostile)
    finally:
        await device.close()
    assert outcome.status == "failed" and not outcome.sent


@pytest.mark.parametrize(
    "config",
    [
        {"epochs": 10**9, "batch_size": 32, "learning_rate": 0.01},
        {"epochs": 1, "batch_size": 0, "learning_rate": 0.01},
        {"epochs": 1, "batch_size": 32, "learning_rate": float("nan")},
        {"epochs": None},
    ],
    ids=["billion_epochs", "zero_batch", "nan_lr", "null_epochs"],
)
async def test_a_client_config_outside_the_servers_own_bounds_is_refused_before_train(
    client, org, config
):
    """The server's ClientConfig bounds epochs to 1..1000, batch_size to 1..65536,
    learning_rate to (0, 100]; the agent re-checks nothing and hands a hostile offer's
    values to train (a null even raises TypeError out of take_part)."""
    called = []

    def train(task: LocalTask) -> LocalResult:
        called.append((task.epochs, task.batch_size, task.learning_rate))
        return shift(task)

    device = agent(client, train=train, report_jobs=False)
    _, offer = await _offer(client, org, device)
    hostile = msgspec.structs.replace(offer, client_config=config)
    try:
        outcome = await device.take_part(hostile)
    finally:
        await device.close()
    assert called == [] and outcome.status == "failed"


# -- the user's train callback -------------------------------------------------------------------


async def test_a_train_callback_that_raises_fails_the_job_and_records_the_round(
    client, org, database_url
):
    """A RuntimeError in train escapes take_part: the device job stays 'training' forever,
    the round is not in agent.outcomes (so a later run_once takes it again from the start)
    and agent.run() dies."""

    def train(task: LocalTask) -> LocalResult:
        raise RuntimeError("CUDA out of memory")

    device = agent(client, train=train, report_jobs=True)
    rnd, offer = await _offer(client, org, device)
    try:
        outcome = await device.take_part(offer)
    except RuntimeError:
        outcome = None
    finally:
        await device.close()
    with psycopg.connect(database_url) as conn:
        (state,) = conn.execute(
            "SELECT state FROM device_jobs WHERE round_id = %s", (rnd["id"],)
        ).fetchone()
    assert state == "failed"
    assert outcome is not None and outcome.status == "failed"


# -- the sync loop -------------------------------------------------------------------------------


async def test_a_zero_poll_interval_does_not_make_run_a_busy_loop(
    aiohttp_client, settings, make_org
):
    """run() waits next_poll_interval_seconds as the server says it, unbounded below:
    0 (a misconfigured or hostile server) makes the device sync back-to-back."""
    http = await aiohttp_client(
        create_app(msgspec.structs.replace(settings, sync_interval_seconds=0))
    )
    rpc = RpcClient(http)
    org = await make_org()
    device = agent(rpc, report_jobs=False)
    await device.register(org.token, **DEVICE_DEFAULTS)
    syncs = []
    real_sync = device.sync

    async def counting_sync(**reported):
        syncs.append(time.monotonic())
        return await real_sync(**reported)

    device.sync = counting_sync
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stop.set)
    await device.run(stop=stop)
    await device.close()

    assert len(syncs) <= 3, f"{len(syncs)} syncs in 0.5 s"


# -- the SDK's retries ---------------------------------------------------------------------------


async def test_retry_after_is_bounded_by_max_backoff(aiohttp_server):
    """A Retry-After of an hour (or 'inf') is slept as given: a hostile server or proxy parks
    the device forever, whatever max_backoff says."""
    seen = []

    async def busy(request):
        seen.append(request.method)
        if len(seen) == 1:
            return web.Response(status=503, headers={"Retry-After": "3600"})
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {"ok": True}})

    url = await _serve(aiohttp_server, busy)
    async with Client(url, "fd_x", retries=2, backoff=0.01, max_backoff=0.1) as sdk:
        result = await asyncio.wait_for(sdk.call("no.such.method"), 3)
    assert result == {"ok": True}


async def test_a_502_from_a_proxy_is_retried_like_a_503(aiohttp_server):
    """_send (presigned URLs) retries any 5xx, _post only 429/503: a load balancer's 502/504
    HTML page is decoded as JSON-RPC and raises msgspec.DecodeError on the first try."""
    seen = []

    async def flaky(request):
        seen.append(request.method)
        if len(seen) == 1:
            return web.Response(status=502, text="<html>Bad Gateway</html>")
        return web.json_response({"jsonrpc": "2.0", "id": 1, "result": {"ok": True}})

    url = await _serve(aiohttp_server, flaky)
    async with Client(url, "fd_x", retries=2, backoff=0.01) as sdk:
        result = await sdk.call("no.such.method")
    assert result == {"ok": True}


# -- clipping ------------------------------------------------------------------------------------


class Ones(torch.nn.Module):
    """A Linear(4, 2) whose weights are all 1.0 (as LayerNorm/BatchNorm scales are)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.fill_(1.0)
            self.fc.bias.fill_(1.0)

    def forward(self, x):
        return self.fc(x)


async def test_a_clipped_weights_update_stays_under_the_bound_after_float32_rounding(client, org):
    """_clip scales the delta to bound·(1-1e-5) 'so float32 rounding cannot push it over',
    but for update_format 'weights' the agent then sends float32(base + delta): near 1.0 the
    spacing of float32 is 1.2e-7, each entry rounds up by up to half of it, and the server
    (which measures weights - base in float64) refuses the update as above max_update_norm."""
    async with Client(url_of(client), org.token) as sdk:
        model = await sdk.models.create(name="ones")
        await sdk.models.versions.create_from_module(
            model_id=model.id, module=Ones(), example_input=torch.zeros(2, 4)
        )

    def train(task: LocalTask) -> LocalResult:
        with torch.no_grad():
            for p in task.module.parameters():
                p.add_(1.0)
        return LocalResult(5)

    device = DeviceAgent(url_of(client), module_factory=Ones, train=train, report_jobs=False)
    await device.register(org.token, **DEVICE_DEFAULTS)
    await running_round(client, org, model.id, update_format="weights", max_update_norm=1e-6)
    refused = []
    call = device.client.call

    async def watching(method, params=None, **kw):
        try:
            return await call(method, params, **kw)
        except Exception as exc:
            refused.append((method, str(exc), getattr(exc, "details", None)))
            raise

    device.client.call = watching
    (outcome,) = await device.run_once()
    await device.close()

    assert outcome.status == "uploaded", refused
    assert outcome.clipped


# -- SecAgg+ against a hostile server ------------------------------------------------------------


def test_a_device_refuses_to_mask_with_fewer_active_neighbours_than_the_threshold():
    """read_share_keys accepts whatever set of stage-1 completers the server forwards, even
    none. A server that forwards this device's bundles to its neighbours but forwards no
    bundles *to* it gets a vector masked only by the self mask, then asks the neighbours for
    the self-mask shares ("it survived"): the device's individual update in the clear.
    SecAgg (Bonawitz et al., round 2) aborts when fewer than t neighbours are active."""
    config = dict(fl_secagg.PRIMITIVES) | {
        "devices": 6,
        "neighbours": 4,
        "threshold": 3,
        "clip": 1.0,
        "quantization_bits": 16,
        "max_weight": 100,
        "modulus_bits": 32,
        "dimension": 3,
        "tensors": [{"name": "w"}],
        "update_format": "delta",
    }
    device = SecAggDevice({"w": np.array([0.1, 0.2, 0.3])}, 5)
    device.setup_params("rnd_x")
    import base64

    from fedrpc.fl.secagg import keys

    def pk() -> str:
        return base64.b64encode(keys.public_key(os.urandom(32))).decode()

    neighbours = [{"index": j, "pk1": pk(), "pk2": pk()} for j in (2, 3, 4, 5)]
    assert device.read_setup(
        {"session_id": "ses_x", "config": config, "index": 1, "neighbours": neighbours}
    )
    device.share_keys_params()
    with pytest.raises(InvalidInput):
        device.read_share_keys({"status": "ready", "ciphertexts": []})
