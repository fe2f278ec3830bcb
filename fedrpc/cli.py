"""`fedrpc serve | migrate | admin create-org NAME | call METHOD --params JSON | simulate`.

Without DATABASE_URL the commands use the embedded PostgreSQL under
``FEDRPC_DATA_DIR/pg`` (default ``.data/pg``), so `fedrpc admin` run from the
checkout reaches the database `make run` serves, whether the server is up or
not; `serve` also starts the embedded S3 server unless FEDRPC_S3_ENDPOINT is set.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import msgspec

from fedrpc.settings import Settings, SettingsError, settings_from_env


def _with_database(settings: Settings, stack: ExitStack) -> Settings:
    if settings.database_url:
        return settings
    from fedrpc.embedded import EmbeddedPostgres

    pg = stack.enter_context(EmbeddedPostgres(Path(settings.data_dir) / "pg"))
    return msgspec.structs.replace(settings, database_url=pg.url)


def _with_storage(settings: Settings, stack: ExitStack) -> Settings:
    if settings.s3_endpoint:
        return settings
    from fedrpc.embedded import EmbeddedS3

    s3 = stack.enter_context(EmbeddedS3(Path(settings.data_dir) / "s3"))
    return msgspec.structs.replace(
        settings, s3_endpoint=s3.endpoint, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key
    )


async def _first_org(settings: Settings) -> str | None:
    """Create the first organization on an empty database; returns its key, shown once."""
    from fedrpc.admin import create_org
    from fedrpc.db import Database, load_queries, open_pool

    async with open_pool(settings.database_url, min_size=1, max_size=1) as pool:
        db = Database(pool, load_queries())
        if await db.value("orgs.count_orgs"):
            return None
        _, token = await create_org(db, "default")
        return token


async def _create_org(settings: Settings, name: str) -> tuple[str, str]:
    from fedrpc.admin import create_org
    from fedrpc.db import Database, load_queries, open_pool

    async with open_pool(settings.database_url, min_size=1, max_size=1) as pool:
        org, token = await create_org(Database(pool, load_queries()), name)
        return org.id, token


class CliError(Exception):
    """A command cannot run; the message is the one line printed on stderr (exit status 1)."""


class ListenError(CliError):
    """The address cannot be listened on."""


def load_settings(**flags: object) -> Settings:
    """Settings from the environment and the command's flags, or a CliError naming the bad one.

    Called before anything starts (embedded servers, sockets), so a bad setting leaves nothing
    behind.
    """
    try:
        return settings_from_env(**flags)
    except SettingsError as exc:
        if exc.field in flags:
            where = f"--{exc.field.replace('_', '-')} {exc.value}"
            raise CliError(f"fedrpc: {where} is invalid: {exc.reason}") from None
        raise CliError(f"fedrpc: {exc}") from None


def listen(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for every address of ``host`` (as aiohttp would bind them).

    Bound before anything else starts, so a taken port stops `serve` before it starts an
    embedded server, and no other process can take the port in between.
    """
    hint = "set FEDRPC_PORT (or --port) or stop the other process"
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
        )
    except socket.gaierror:
        raise ListenError(f"fedrpc: cannot resolve host {host!r}; set FEDRPC_HOST") from None
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, address in dict.fromkeys(infos):  # each address once
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
    except OSError as exc:
        for sock in socks:
            sock.close()
        where = f"port {port} on {host}"
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"fedrpc: {where} is already in use; {hint}") from None
        if exc.errno == errno.EACCES:
            raise ListenError(f"fedrpc: no permission to listen on {where}; {hint}") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ListenError(
                f"fedrpc: {host} is not an address of this machine; set FEDRPC_HOST"
            ) from None
        raise ListenError(f"fedrpc: cannot listen on {where} ({exc.strerror})") from None
    return socks


def cmd_serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = load_settings(**overrides)
    socks = listen(settings.host, settings.port)
    try:
        return _serve(settings, socks)
    finally:
        for sock in socks:
            sock.close()


def _serve(settings: Settings, socks: list[socket.socket]) -> int:
    from aiohttp import web

    from fedrpc.app import create_app
    from fedrpc.call_log import configure_logging
    from fedrpc.db import migrate

    with ExitStack() as stack:  # stops the embedded servers however serving ends
        settings = _with_storage(_with_database(settings, stack), stack)
        configure_logging(settings.log_level)
        asyncio.run(migrate(settings.database_url))
        token = asyncio.run(_first_org(settings))
        url = f"http://{settings.host}:{settings.port}/rpc"
        if token:
            print(
                f"\nCreated organization 'default'. Its admin API key (shown only now):\n\n    {token}\n"
            )
        else:
            print(
                "\nUsing the existing organizations; `fedrpc admin create-org NAME` makes a new one with a key.\n"
            )
        print("Try it:\n")
        print(
            f"    curl -s {url} -H 'Authorization: Bearer {token or '<your key>'}' \\\n"
            '      -d \'{"jsonrpc": "2.0", "method": "system.ping", "id": 1}\'\n',
            flush=True,
        )
        app = create_app(settings)
        # Everything imported so far (torch, numpy, the registry) lives as long as the
        # process: moved out of the collector's sight, it is not traversed again by every
        # full collection the request path's garbage triggers.
        gc.collect()
        gc.freeze()
        web.run_app(app, sock=socks, print=None, access_log=None)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from fedrpc.db import migrate

    with ExitStack() as stack:
        settings = _with_database(load_settings(), stack)
        applied = asyncio.run(migrate(settings.database_url))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def cmd_create_org(args: argparse.Namespace) -> int:
    from fedrpc.db import migrate

    with ExitStack() as stack:
        settings = _with_database(load_settings(), stack)
        asyncio.run(migrate(settings.database_url))
        org_id, token = asyncio.run(_create_org(settings, args.name))
    print(f"organization {org_id} ({args.name})\nadmin API key (shown only now): {token}")
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    url = os.environ.get("FEDRPC_URL", "http://127.0.0.1:8080/rpc")
    token = os.environ.get("FEDRPC_TOKEN")
    envelope = {"jsonrpc": "2.0", "method": args.method, "id": 1}
    if args.params:
        envelope["params"] = json.loads(args.params)
    request = urllib.request.Request(
        url,
        data=json.dumps(envelope).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:
            body = json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"null")
    print(json.dumps(body.get("result", body) if isinstance(body, dict) else body, indent=2))
    return 1 if isinstance(body, dict) and "error" in body else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedrpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="serve POST /rpc (embedded Postgres and S3 unless configured)"
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(run=cmd_serve)
    sub.add_parser("migrate", help="apply pending migrations").set_defaults(run=cmd_migrate)
    admin = sub.add_parser("admin", help="operator commands").add_subparsers(
        dest="admin", required=True
    )
    create_org = admin.add_parser("create-org", help="create an organization and print its API key")
    create_org.add_argument("name")
    create_org.set_defaults(run=cmd_create_org)
    call = sub.add_parser("call", help="call a method (FEDRPC_URL, FEDRPC_TOKEN)")
    call.add_argument("method")
    call.add_argument("--params", help="JSON object or array")
    call.add_argument("--timeout", type=float, default=60)
    call.set_defaults(run=cmd_call)
    from fedrpc.sim.command import add_parser as add_simulate

    add_simulate(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CliError as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    # `python -m fedrpc.cli` runs this file as __main__; run the imported module instead, so
    # that CliError raised by the commands' modules (fedrpc.sim.command) is the one caught.
    from fedrpc.cli import main as imported_main

    sys.exit(imported_main())
