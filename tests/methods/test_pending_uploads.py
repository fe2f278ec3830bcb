"""uploads.create: one device (or one org's keys) holds a bounded number of pending uploads.

Each pending upload is a presigned PUT of up to FEDRPC_MAX_UPLOAD_BYTES: without a bound a
single device token could reserve any amount of S3.
"""

from __future__ import annotations

import asyncio

import msgspec
import psycopg

from fedrpc.app import create_app
from tests.conftest import RpcClient, register_device

UPLOAD = {"purpose": "weights", "size_bytes": 8, "sha256": "0" * 64}


async def test_an_uploader_holds_at_most_the_limit_of_pending_uploads(
    aiohttp_client, settings, database_url
):
    from fedrpc.admin import create_org
    from fedrpc.app import SERVICES

    client = RpcClient(
        await aiohttp_client(create_app(msgspec.structs.replace(settings, max_pending_uploads=3)))
    )
    db = client.app[SERVICES].db
    _, org_token = await create_org(db, "acme")
    _, other_org_token = await create_org(db, "globex")
    device = await register_device(client, org_token)
    sibling = await register_device(client, org_token)

    # Concurrent calls cannot slip past the count: exactly three of six succeed.
    answers = await asyncio.gather(
        *(
            client.post(
                {"jsonrpc": "2.0", "id": i, "method": "uploads.create", "params": UPLOAD},
                device["token"],
            )
            for i in range(6)
        )
    )
    bodies = [body for _, body in answers]
    assert sum("result" in b for b in bodies) == 3
    refused = [b["error"] for b in bodies if "error" in b]
    assert all(e["data"]["type"] == "rate_limited" for e in refused)
    assert all(e["data"]["reason"] == "pending_uploads" for e in refused)
    assert all(resp.status == 429 for resp, body in answers if "error" in body)

    # Another device of the same org, the org's own keys and another org are not affected.
    for token in (sibling["token"], org_token, other_org_token):
        await client.ok("uploads.create", UPLOAD, token)

    # An expired upload no longer counts.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE uploads SET expires_at = now() - interval '1 second'"
            " WHERE id = (SELECT id FROM uploads WHERE device_id = %s LIMIT 1)",
            (device["device_id"],),
        )
    await client.ok("uploads.create", UPLOAD, device["token"])
    error = await client.error("uploads.create", UPLOAD, device["token"])
    assert error["data"]["type"] == "rate_limited"
