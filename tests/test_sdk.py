"""The SDK (fedrpc.client.Client / SyncClient) against the real server over HTTP."""

from __future__ import annotations

import asyncio

import msgspec
import psycopg
import pytest

from fedrpc.app import SERVICES, create_app
from fedrpc.client import Client, SyncClient
from fedrpc.errors import BadRequest, NotFound, Unauthorized
from schemas.models import Model
from schemas.orgs import Org


def url_of(client) -> str:
    return str(client.http.make_url("/rpc"))


async def test_namespaces_call_methods_and_results_are_the_methods_structs(client, org):
    async with Client(url_of(client), org.token) as sdk:
        me = await sdk.orgs.get()
        model = await sdk.models.create(name="sdk-model")
        listed = await sdk.models.list()

    assert isinstance(me, Org) and me.id == org.id
    assert isinstance(model, Model) and model.name == "sdk-model"
    assert [m.id for m in listed.items] == [model.id]


async def test_errors_raise_the_servers_exception_types(client, org):
    async with Client(url_of(client), org.token) as sdk:
        with pytest.raises(NotFound) as missing:
            await sdk.models.get(model_id="mdl_" + "0" * 32)
        with pytest.raises(BadRequest) as invalid:
            await sdk.models.create(name="")
    async with Client(url_of(client), "fk_wrong") as stranger:
        with pytest.raises(Unauthorized):
            await stranger.orgs.get()
    assert missing.value.code == 4404 and "request_id" in missing.value.details
    # The server's path to the bad value survives into the exception.
    assert invalid.value.code == -32602 and invalid.value.details["path"] == "$.name"


async def test_a_batch_answers_each_call_or_its_exception(client, org):
    async with Client(url_of(client), org.token) as sdk:
        model, missing = await sdk.batch(
            [
                ("models.create", {"name": "in-a-batch"}),
                ("models.get", {"model_id": "mdl_" + "1" * 32}),
            ]
        )
    assert isinstance(model, Model) and isinstance(missing, NotFound)


async def test_rate_limited_calls_are_retried_and_a_retry_never_doubles_a_creation(
    aiohttp_client, settings, make_org, database_url
):
    tight = msgspec.structs.replace(settings, rate_limit_per_second=4.0, rate_limit_burst=2)
    http = await aiohttp_client(create_app(tight))
    org = await make_org()
    async with Client(str(http.make_url("/rpc")), org.token, backoff=0.05) as sdk:
        created = await asyncio.gather(*(sdk.models.create(name=f"m{i}") for i in range(6)))

    assert sorted(m.name for m in created) == [f"m{i}" for i in range(6)]
    assert http.app[SERVICES].metrics._errors["rate_limited"][0] >= 3  # it did retry
    with psycopg.connect(database_url) as conn:
        stored = conn.execute("SELECT count(*) FROM models WHERE org_id = %s", (org.id,)).fetchone()
    assert stored[0] == 6  # each creation once, however many times its call was sent


async def test_the_sync_client_works_without_an_event_loop(client, org):
    sdk = SyncClient(url_of(client), org.token)

    me = await asyncio.to_thread(sdk.orgs.get)
    with pytest.raises(NotFound):
        await asyncio.to_thread(lambda: sdk.models.get(model_id="mdl_" + "2" * 32))

    assert me.id == org.id
