"""The storage lifecycle: sized presigned PUTs, the collector, and objects and rows after a crash.

Everything runs against the suite's real Postgres and S3; the crash is a real
server process killed (SIGKILL) between writing an object and its row.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgspec
import psycopg
import pytest
from minio import Minio

from fedrpc import tasks
from fedrpc.app import SERVICES
from fedrpc.embedded._process import free_ports, http_ok
from fedrpc.services import storage_gc
from fedrpc.storage import Storage
from fedrpc.tasks import IDEMPOTENCY_WINDOW_SECONDS
from tests.conftest import register_device
from tests.methods.conftest import inline
from tests.methods.test_weights_upload import running_round, update_bytes, upload_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(settings, monkeypatch, request):
    """Every update in S3 (unless a test asks otherwise) and no grace period; the tests run the
    collector themselves (the app's background loop runs the other jobs), so what a pass did
    is theirs to count."""
    others = tuple(job for job in tasks.JOBS if job is not tasks.collect_storage_garbage)
    monkeypatch.setattr(tasks, "JOBS", others)
    overrides = {"row_update_max_bytes": 0, **getattr(request, "param", {})}
    return msgspec.structs.replace(settings, storage_gc_grace_seconds=0, **overrides)


def s3(settings) -> Minio:
    return Minio(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, secure=False)


def put_object(settings, key: str, data: bytes) -> None:
    s3(settings).put_object(settings.s3_bucket, key, io.BytesIO(data), len(data))


def object_keys(settings) -> set[str]:
    found = s3(settings).list_objects(settings.s3_bucket, recursive=True)
    return {o.object_name for o in found}


def sql(database_url: str, query: str, *args) -> list[tuple]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


def assert_objects_and_rows_agree(settings, database_url: str) -> None:
    """No object of ours without a row naming it, no row naming a missing object (an upload
    row only reserves its key), nothing left to delete."""
    ours = {k for k in object_keys(settings) if k.startswith(storage_gc.PREFIXES)}
    named = {k for (k,) in sql(database_url, "SELECT object_key FROM stored_object_refs")}
    reserved = {k for (k,) in sql(database_url, "SELECT object_key FROM uploads")}
    assert ours - named == set(), "objects without a row"
    assert named - reserved - ours == set(), "rows naming a missing object"
    assert sql(database_url, "SELECT object_key FROM doomed_objects") == []


async def collect(client, **overrides) -> storage_gc.Collected:
    """One pass, as the background job makes it (with these settings changed)."""
    services = client.app[SERVICES]
    settings = msgspec.structs.replace(services.settings, **overrides)
    return await storage_gc.collect(
        services.db,
        services.storage,
        settings,
        used_upload_keep_seconds=IDEMPOTENCY_WINDOW_SECONDS,
    )


async def create_upload(client, token: str, data: bytes) -> dict:
    params = {"purpose": "weights", "size_bytes": len(data)}
    return await client.ok(
        "uploads.create", {**params, "sha256": hashlib.sha256(data).hexdigest()}, token
    )


async def put(url: str, data, **kwargs) -> int:
    async with aiohttp.ClientSession() as http, http.put(url, data=data, **kwargs) as resp:
        return resp.status


@pytest.fixture
async def device(client, org) -> dict:
    return await register_device(client, org.token)


async def test_s3_refuses_a_presigned_put_of_another_length(client, settings, device):
    data = os.urandom(1000)
    upload = await create_upload(client, device["token"], data)

    async def chunked():
        yield data + b"more"

    assert await put(upload["url"], data + b"x") == 403
    assert await put(upload["url"], data[:-1]) == 403
    assert await put(upload["url"], chunked()) == 403  # no Content-Length at all
    assert object_keys(settings) == set()
    assert await put(upload["url"], data) == 200
    assert len(object_keys(settings)) == 1


async def test_storage_reads_no_more_than_asked(client, settings):
    storage: Storage = client.app[SERVICES].storage
    put_object(settings, "uploads/o/big", b"0123456789" * 100)
    assert await storage.get("uploads/o/big", max_bytes=10) == b"0123456789"
    assert len(await storage.get("uploads/o/big", max_bytes=5000)) == 1000


async def test_an_upload_whose_object_is_larger_than_declared_is_refused(
    client, org, settings, mlp_model, device
):
    # Written behind the URL's back (another S3 client with the server's keys): the stat
    # before the read catches it, and nothing more than declared would be read.
    rnd = await running_round(client, org, mlp_model, [device])
    data = update_bytes(1)
    upload = await create_upload(client, device["token"], data)
    [key] = sql(settings.database_url, "SELECT object_key FROM uploads")[0]
    put_object(settings, key, data + b"\0" * 64)
    error = await client.error(
        "training.weights.upload",
        upload_params(rnd, weights={"upload_id": upload["upload_id"]}),
        device["token"],
    )
    assert error["data"]["type"] == "bad_request" and "declared" in error["data"]["message"]


async def test_uploads_are_deleted_once_expired_unused_or_used_a_day_ago(
    client, settings, database_url, device
):
    rows = {}
    for name in ("expired", "live", "used_long_ago", "used_recently"):
        data = os.urandom(64) + name.encode()
        upload = await create_upload(client, device["token"], data)
        assert await put(upload["url"], data) == 200
        rows[name] = upload["upload_id"]
    expire = "UPDATE uploads SET expires_at = now() - interval '1 second' WHERE id <> %s"
    sql(database_url, expire, rows["live"])
    use = "UPDATE uploads SET consumed_at = now() - %s::interval WHERE id = %s"
    sql(database_url, use, "25 hours", rows["used_long_ago"])
    sql(database_url, use, "0 seconds", rows["used_recently"])

    done = await collect(client)

    left = {i for (i,) in sql(database_url, "SELECT id FROM uploads")}
    assert left == {rows["live"], rows["used_recently"]}
    assert done.uploads == 2 and done.deleted == 2
    assert len([k for k in object_keys(settings) if k.startswith("uploads/")]) == 2
    assert_objects_and_rows_agree(settings, database_url)


async def test_orphans_are_deleted_after_the_grace_period_and_named_objects_stay(
    client, settings, database_url, mlp_model
):
    artifacts = object_keys(settings)  # version 1 of the model
    orphans = {"updates/rnd_x/upd_orphan", "models/m/server-state/replaced.safetensors"}
    for key in [*orphans, "operator/notes.txt"]:
        put_object(settings, key, b"no row names it")

    young = await collect(client, storage_gc_grace_seconds=3600)
    assert (young.orphans, young.deleted) == (0, 0)

    done = await collect(client)
    assert (done.orphans, done.deleted) == (2, 2)
    assert object_keys(settings) == artifacts | {"operator/notes.txt"}  # not under our prefixes
    assert_objects_and_rows_agree(settings, database_url)


async def test_a_doomed_object_that_a_row_names_again_is_kept(client, org, settings, database_url):
    # Seen unnamed by a sweep, then written again under the same key and named by a row
    # before its deletion was due (a writer that reuses a key for the same bytes).
    key = "secagg/r/s/mean.safetensors"
    put_object(settings, key, b"written again, then its row")
    sql(database_url, "INSERT INTO doomed_objects (object_key, reason) VALUES (%s, 'orphan')", key)
    name_it = """INSERT INTO uploads (id, org_id, object_key, size_bytes, sha256, purpose, expires_at)
                 VALUES ('upl_x', %s, %s, 1, '', 'weights', now() + interval '1 hour')"""
    sql(database_url, name_it, org.id, key)

    done = await collect(client)

    assert done.deleted == 0 and key in object_keys(settings)
    assert sql(database_url, "SELECT count(*) FROM doomed_objects") == [(0,)]


async def test_a_failed_delete_leaves_its_record_and_the_next_pass_finishes(
    client, settings, database_url, device
):
    data = os.urandom(100)
    upload = await create_upload(client, device["token"], data)
    assert await put(upload["url"], data) == 200
    sql(database_url, "UPDATE uploads SET expires_at = now() - interval '1 second'")
    services = client.app[SERVICES]
    unreachable = Storage("127.0.0.1:9", "k", "s", settings.s3_bucket)  # nothing listens there
    with pytest.raises(Exception, match="unreachable"):
        await storage_gc.collect(
            services.db, unreachable, services.settings, used_upload_keep_seconds=0
        )
    # The row is gone and the key recorded in the same transaction: nothing is lost track of.
    assert sql(database_url, "SELECT count(*) FROM uploads") == [(0,)]
    assert sql(database_url, "SELECT reason FROM doomed_objects") == [("upload",)]

    await collect(client)
    assert_objects_and_rows_agree(settings, database_url)
    assert not [k for k in object_keys(settings) if k.startswith("uploads/")]


AUDIT = "SELECT id, sha256, size_bytes, sample_count, metrics FROM training_updates ORDER BY id"
BYTES = """SELECT round_id, data IS NOT NULL, purged_at IS NOT NULL FROM training_updates
           ORDER BY round_id = %s, id"""


@pytest.mark.parametrize(
    "settings", [{"row_update_max_bytes": 0}, {"row_update_max_bytes": 65536}], indirect=True
)
async def test_raw_updates_are_purged_after_the_retention_and_tombstones_stay(
    client, org, settings, database_url, mlp_model
):
    in_rows = settings.row_update_max_bytes > 0
    devices = [await register_device(client, org.token) for _ in range(2)]
    ended = await running_round(client, org, mlp_model, devices)
    for i, d in enumerate(devices):
        params = upload_params(ended, update_bytes(i), metrics={"loss": 0.5})
        await client.ok("training.weights.upload", params, d["token"])
    await client.ok("training.cancel_round", {"round_id": ended["id"]}, org.token)
    recent = await running_round(client, org, mlp_model, devices)
    await client.ok("training.weights.upload", upload_params(recent), devices[0]["token"])
    audit = sql(database_url, AUDIT)
    backdate = "UPDATE training_rounds SET finished_at = now() - %s::interval WHERE id = %s"
    sql(database_url, backdate, "8 days", ended["id"])

    done = await collect(client, update_retention_seconds=7 * 24 * 3600)

    assert done.updates == 2 and done.deleted == (0 if in_rows else 2)
    assert sql(database_url, AUDIT) == audit  # counts, sizes, digests and metrics stay
    assert sql(database_url, BYTES, ended["id"]) == [
        (recent["id"], in_rows, False),
        (ended["id"], False, True),
        (ended["id"], False, True),
    ]
    kept = [] if in_rows else [k for k in object_keys(settings) if k.startswith("updates/")]
    assert all(k.startswith(f"updates/{recent['id']}/") for k in kept) and len(kept) == 1 - in_rows
    marked = sql(database_url, "SELECT id FROM training_rounds WHERE updates_purged_at IS NOT NULL")
    assert marked == [(ended["id"],)]
    assert_objects_and_rows_agree(settings, database_url)


async def test_several_collectors_at_once_share_the_work(client, settings, database_url):
    for i in range(30):
        put_object(settings, f"updates/r/orphan-{i:02}", b"x")

    passes = await asyncio.gather(*(collect(client, storage_gc_batch=10) for _ in range(4)))
    while sum(p.deleted for p in passes) < 30 and len(passes) < 40:
        passes += await asyncio.gather(*(collect(client, storage_gc_batch=10) for _ in range(4)))

    assert sum(p.deleted for p in passes) == 30  # each object deleted by exactly one of them
    assert sum(p.orphans for p in passes) == 30
    assert_objects_and_rows_agree(settings, database_url)


async def test_a_sweep_held_by_a_dead_process_resumes_after_its_lease(
    client, settings, database_url
):
    put_object(settings, "updates/r/orphan", b"x")
    sql(database_url, "UPDATE storage_sweep SET leased_until = now() + interval '1 minute'")
    assert (await collect(client)).orphans == 0
    sql(database_url, "UPDATE storage_sweep SET leased_until = now() - interval '1 second'")
    assert (await collect(client)).orphans == 1
    assert object_keys(settings) == set()


def test_every_column_that_names_an_object_is_in_stored_object_refs(database_url):
    in_view = set(
        sql(
            database_url,
            "SELECT table_name, column_name FROM information_schema.view_column_usage"
            " WHERE view_name = 'stored_object_refs'",
        )
    )
    key_columns = set(
        sql(
            database_url,
            "SELECT c.table_name, c.column_name FROM information_schema.columns AS c"
            " JOIN information_schema.tables AS t USING (table_schema, table_name)"
            " WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'"
            " AND c.column_name LIKE '%%\\_key' AND c.data_type = 'text'",
        )
    )
    not_owners = {
        ("device_jobs", "adapter_key"),  # a record of which object a job produced
        ("devices", "registered_by_key"),  # an API key's id
        ("doomed_objects", "object_key"),  # the objects to delete
    }
    assert key_columns - not_owners == {(t, c) for t, c in in_view if c.endswith("_key")}


def test_the_collector_is_a_background_job():
    assert tasks.collect_storage_garbage in tasks.JOBS


async def test_the_background_job_makes_a_pass(client, settings, database_url):
    put_object(settings, "personalized/d/m/-/replaced.safetensors", b"old weights")
    await tasks.collect_storage_garbage(client.app[SERVICES])
    assert object_keys(settings) == set()


CHILD = """
import os, signal, sys
from fedrpc.storage import Storage

put = Storage.put

async def put_then_die(self, key, data, *args, **kwargs):
    stored = await put(self, key, data, *args, **kwargs)
    if key.startswith(os.environ["FEDRPC_TEST_DIE_AFTER_PUT_OF"]):
        os.kill(os.getpid(), signal.SIGKILL)  # the object is written, its row is not
    return stored

Storage.put = put_then_die
# Like the test's own app, no collector pass of its own (one killed mid-sweep would hold the
# sweep's lease for LEASE_SECONDS: test_a_sweep_held_by_a_dead_process_resumes_after_its_lease).
from fedrpc import tasks
tasks.JOBS = tuple(job for job in tasks.JOBS if job is not tasks.collect_storage_garbage)
from fedrpc.cli import main
sys.exit(main(["serve"]))
"""


def start_doomed_server(settings, die_after_put_of: str) -> tuple[subprocess.Popen, str]:
    """A real `fedrpc serve` on the test's database and bucket, killed by SIGKILL right after
    it writes an object whose key starts with ``die_after_put_of``."""
    [port] = free_ports(1)
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "FEDRPC_S3_ENDPOINT": settings.s3_endpoint,
        "FEDRPC_S3_ACCESS_KEY": settings.s3_access_key,
        "FEDRPC_S3_SECRET_KEY": settings.s3_secret_key,
        "FEDRPC_S3_BUCKET": settings.s3_bucket,
        "FEDRPC_PORT": str(port),
        "FEDRPC_ROW_UPDATE_MAX_BYTES": "0",
        "FEDRPC_BACKGROUND_INTERVAL_SECONDS": "3600",
        "FEDRPC_LOG_LEVEL": "WARNING",
        "FEDRPC_TEST_DIE_AFTER_PUT_OF": die_after_put_of,
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not http_ok(port, "/healthz"):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            child.wait()
            raise AssertionError("the server did not start")
        time.sleep(0.05)
    return child, f"http://127.0.0.1:{port}/rpc"


async def call_doomed_server(child: subprocess.Popen, url: str, method: str, params, token) -> None:
    """Make the call that kills the server; it must die by SIGKILL without answering."""
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await http.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    assert await asyncio.to_thread(child.wait, 30) == -9


async def test_servers_killed_between_object_and_row_leave_orphans_the_collector_deletes(
    client, org, settings, database_url, mlp_model, mlp_bundle, device
):
    rnd = await running_round(client, org, mlp_model, [device])
    artifacts = object_keys(settings)  # version 1's
    # Two servers on the test's database and bucket, one killed right after it wrote an
    # update's object, the other after the first object of a new version (of four).
    (update_server, update_url), (version_server, version_url) = await asyncio.gather(
        asyncio.to_thread(start_doomed_server, settings, f"updates/{rnd['id']}/"),
        asyncio.to_thread(start_doomed_server, settings, f"models/{mlp_model['id']}/"),
    )
    try:
        await call_doomed_server(
            update_server,
            update_url,
            "training.weights.upload",
            upload_params(rnd),
            device["token"],
        )
        version = {"model_id": mlp_model["id"], **inline(mlp_bundle[1])}
        await call_doomed_server(
            version_server, version_url, "models.versions.create", version, org.token
        )
    finally:
        for child in (update_server, version_server):
            child.kill()
            child.wait()
    orphans = object_keys(settings) - artifacts
    assert any(k.startswith("updates/") for k in orphans)
    assert any(k.startswith("models/") for k in orphans)
    assert sql(database_url, "SELECT count(*) FROM training_updates") == [(0,)]
    assert sql(database_url, "SELECT max(version) FROM model_versions") == [(1,)]

    # A normal server on the same database and bucket: the device uploads again, and one
    # collector pass deletes what the killed ones left without a row.
    update = await client.ok("training.weights.upload", upload_params(rnd), device["token"])
    await collect(client)

    assert object_keys(settings) == artifacts | {f"updates/{rnd['id']}/{update['id']}"}
    assert_objects_and_rows_agree(settings, database_url)
