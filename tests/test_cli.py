"""The `fedrpc` command against the suite's real database and a real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import psycopg


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
