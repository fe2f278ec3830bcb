"""The `fedrpc` command against the suite's real database and a real server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys

import psycopg
import pytest


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedrpc.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_is_idempotent_and_create_org_prints_a_working_key(database_url):
    env = {"DATABASE_URL": database_url}
    first = run_cli("migrate", env=env)
    assert first.returncode == 0 and "nothing (up to date)" in first.stdout
    created = run_cli("admin", "create-org", "initech", env=env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().rsplit(" ", 1)[1]
    assert token.startswith("fk_")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM orgs WHERE name = 'initech'").fetchone()[0] == 1
        stored = conn.execute("SELECT token_hash FROM api_keys").fetchone()[0]
    assert token.encode() not in bytes(stored)


async def test_call_prints_the_result_and_fails_on_errors(client, org):
    url = str(client.http.make_url("/rpc"))
    env = {"FEDRPC_URL": url, "FEDRPC_TOKEN": org.token}
    ok = await asyncio.to_thread(run_cli, "call", "orgs.get", "--params", "{}", env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["id"] == org.id
    bad = await asyncio.to_thread(
        run_cli, "call", "models.get", "--params", '{"model_id": "nope"}', env=env
    )
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["code"] == -32602


@pytest.mark.parametrize("embedded", [False, True], ids=["configured services", "embedded"])
def test_serve_on_a_taken_port_says_so_in_one_line_and_starts_nothing(services, tmp_path, embedded):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = {"FEDRPC_PORT": str(port), "FEDRPC_DATA_DIR": str(tmp_path / "data")}
    if not embedded:
        env |= {
            "DATABASE_URL": services.admin_url,
            "FEDRPC_S3_ENDPOINT": services.s3_endpoint,
            "FEDRPC_S3_ACCESS_KEY": services.s3_access_key,
            "FEDRPC_S3_SECRET_KEY": services.s3_secret_key,
        }
    with taken:
        result = run_cli("serve", "--host", "127.0.0.1", env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"fedrpc: port {port} on 127.0.0.1 is already in use;"
        " set FEDRPC_PORT (or --port) or stop the other process"
    ]
    # Nothing was started that could outlive the command: no embedded data folder at all.
    assert not (tmp_path / "data").exists()


# Unreachable on purpose: were a bad port let through, the command would fail at once on
# these instead of starting an embedded Postgres or S3 that could outlive the test.
NOWHERE = {
    "DATABASE_URL": "postgresql://fedrpc@127.0.0.1:1/nowhere?connect_timeout=1",
    "FEDRPC_S3_ENDPOINT": "127.0.0.1:1",
}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("70000", "expected an integer <= 65535"),
        ("65536", "expected an integer <= 65535"),
        ("-1", "expected an integer >= 1"),
        ("0", "expected an integer >= 1"),
        ("abc", "expected an integer"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_an_invalid_port_is_named_in_one_line_and_starts_nothing(tmp_path, command, value, reason):
    env = {**NOWHERE, "FEDRPC_PORT": value, "FEDRPC_DATA_DIR": str(tmp_path / "data")}
    args = ("serve", "--host", "127.0.0.1") if command == "serve" else (command,)
    result = run_cli(*args, env=env)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [f"fedrpc: FEDRPC_PORT='{value}' is invalid: {reason}"]
    assert not (tmp_path / "data").exists()


def test_an_invalid_port_flag_is_named_in_one_line(tmp_path):
    env = {**NOWHERE, "FEDRPC_DATA_DIR": str(tmp_path / "data")}
    result = run_cli("serve", "--host", "127.0.0.1", "--port", "70000", env=env)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        "fedrpc: --port 70000 is invalid: expected an integer <= 65535"
    ]
    assert not (tmp_path / "data").exists()


def test_any_invalid_setting_is_named_in_one_line(tmp_path):
    env = {**NOWHERE, "FEDRPC_PUBLIC_URL": "fl.example.com", "FEDRPC_DATA_DIR": str(tmp_path)}
    result = run_cli("migrate", env=env)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        "fedrpc: FEDRPC_PUBLIC_URL='fl.example.com' is invalid:"
        " expected an absolute http(s) URL without query or fragment"
    ]
