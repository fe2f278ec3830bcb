"""The embedded PostgreSQL and S3 that `make run` and the suite start: real processes, loopback only."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from minio import Minio
from minio.error import S3Error

from fedrpc.embedded import SCRATCH_ROOT, EmbeddedPostgres, EmbeddedS3

BUCKET = "embedded-test"
REPO = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _gone(pid: int, seconds: float = 10.0) -> bool:
    """Whether ``pid`` exits within ``seconds``: pg_ctl stop returns once the postmaster has
    removed its pid file, a moment before the process itself is gone (longer on a busy machine)."""
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _tcp_listeners(pid: int) -> set[str]:
    """The local addresses (hex ``IP:PORT`` as in /proc/net/tcp*) that ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                listening.add(fields[1])
    return listening


def _client(s3: EmbeddedS3, access_key: str | None, secret_key: str | None) -> Minio:
    return Minio(s3.endpoint, access_key, secret_key, secure=False, region="us-east-1")


@pytest.fixture
def fast_path():
    """A directory on tmpfs when there is one: initdb on a loaded disk takes seconds."""
    path = Path(tempfile.mkdtemp(prefix="fedrpc-test-", dir=SCRATCH_ROOT))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def s3():
    with EmbeddedS3.temporary() as server:
        _client(server, server.access_key, server.secret_key).make_bucket(BUCKET)
        yield server


def test_temporary_postgres_answers_and_leaves_nothing_after_stop():
    pg = EmbeddedPostgres.temporary()

    url = pg.start()
    with psycopg.connect(url) as conn:
        answer = conn.execute("SELECT 1").fetchone()
    pid = pg.pid
    tcp = _tcp_listeners(pid)
    pg.stop()

    assert answer == (1,)
    assert tcp == set()
    assert _gone(pid)
    assert not pg.data_dir.exists()
    assert not pg.data_dir.parent.exists()


def test_s3_and_its_sub_servers_listen_on_loopback_only(s3):
    listening = _tcp_listeners(s3.pid)

    hosts = {address.split(":")[0] for address in listening}
    ports = {int(address.split(":")[1], 16) for address in listening}

    assert hosts == {"0100007F"}  # 127.0.0.1, little-endian hex
    assert int(s3.endpoint.rsplit(":", 1)[1]) in ports


def test_object_round_trips_through_s3(s3):
    client = _client(s3, s3.access_key, s3.secret_key)
    body = os.urandom(3000)

    client.put_object(BUCKET, "plain/blob", io.BytesIO(body), len(body))
    response = client.get_object(BUCKET, "plain/blob")
    try:
        fetched = response.read()
    finally:
        response.close()
        response.release_conn()

    assert fetched == body


def test_presigned_put_then_presigned_get_carry_the_bytes(s3):
    client = _client(s3, s3.access_key, s3.secret_key)
    body = os.urandom(5000)
    put_url = client.presigned_put_object(BUCKET, "presigned/blob", expires=timedelta(minutes=5))
    get_url = client.presigned_get_object(BUCKET, "presigned/blob", expires=timedelta(minutes=5))

    put = urllib.request.Request(put_url, data=body, method="PUT")
    with urllib.request.urlopen(put, timeout=10) as response:
        put_status = response.status
    with urllib.request.urlopen(get_url, timeout=10) as response:
        fetched = response.read()

    assert put_status == 200
    assert fetched == body


@pytest.mark.parametrize(
    ("keys", "code"),
    [
        ("wrong_secret", "SignatureDoesNotMatch"),
        ("unknown_access_key", "InvalidAccessKeyId"),
        ("anonymous", "AccessDenied"),
    ],
)
def test_s3_refuses_requests_without_the_configured_keys(s3, keys, code):
    access_key, secret_key = {
        "wrong_secret": (s3.access_key, "not-the-secret"),
        "unknown_access_key": ("nobody", s3.secret_key),
        "anonymous": (None, None),
    }[keys]
    client = _client(s3, access_key, secret_key)

    with pytest.raises(S3Error) as refused:
        client.list_buckets()
    with pytest.raises(S3Error):
        client.get_object(BUCKET, "plain/blob")

    assert refused.value.code == code


def test_stopped_s3_leaves_no_process_no_socket_and_no_scratch_dir():
    s3 = EmbeddedS3.temporary()
    s3.start()
    pid, port, data_dir = s3.pid, int(s3.endpoint.rsplit(":", 1)[1]), s3.data_dir

    s3.stop()

    assert _gone(pid)
    assert not data_dir.exists()
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{port}.sock"))


def test_persistent_s3_keeps_credentials_port_and_objects_across_runs(fast_path):
    first = EmbeddedS3(fast_path / "s3")
    with first:
        endpoint, keys = first.endpoint, (first.access_key, first.secret_key)
        client = _client(first, *keys)
        client.make_bucket(BUCKET)
        client.put_object(BUCKET, "kept", io.BytesIO(b"still here"), 10)

    with EmbeddedS3(fast_path / "s3") as second:
        again = (second.endpoint, second.access_key, second.secret_key)
        response = _client(second, *keys).get_object(BUCKET, "kept")
        kept = response.read()
        response.close()
        response.release_conn()

    mode = stat.S_IMODE((fast_path / "s3" / "credentials.json").stat().st_mode)
    assert again == (endpoint, *keys)
    assert kept == b"still here"
    assert mode == 0o600


_OTHER_PROCESS = """
import sys, psycopg
from fedrpc.embedded import EmbeddedPostgres
with EmbeddedPostgres(sys.argv[1]) as pg, psycopg.connect(pg.url, autocommit=True) as conn:
    conn.execute("INSERT INTO seen VALUES ('other')")
"""


def test_second_process_reaches_the_same_persistent_database_and_leaves_it_up(fast_path):
    with EmbeddedPostgres(fast_path / "pg") as pg:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE seen (who text)")

        subprocess.run(
            [sys.executable, "-c", _OTHER_PROCESS, str(fast_path / "pg")],
            check=True, cwd=REPO, timeout=60,
        )  # fmt: skip
        with psycopg.connect(pg.url) as conn:
            rows = conn.execute("SELECT who FROM seen").fetchall()
        pid = pg.pid

    assert rows == [("other",)]
    assert _gone(pid)


_KILLED_PROCESS = """
import json, os, signal
from fedrpc.embedded import EmbeddedPostgres, EmbeddedS3
pg, s3 = EmbeddedPostgres.temporary(), EmbeddedS3.temporary()
pg.start(), s3.start()
print(json.dumps({"pids": [pg.pid, s3.pid], "dirs": [str(pg.data_dir.parent), str(s3.data_dir)]}))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_servers_of_a_killed_process_are_reaped_by_the_next_temporary():
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_PROCESS], capture_output=True, cwd=REPO, timeout=60
    )
    left = json.loads(killed.stdout)  # printed once both servers were up

    EmbeddedPostgres.temporary().stop()
    EmbeddedS3.temporary().stop()

    assert killed.returncode == -signal.SIGKILL
    assert not any(_alive(pid) for pid in left["pids"])
    assert not any(Path(d).exists() for d in left["dirs"])
