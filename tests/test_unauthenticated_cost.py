"""A request without a valid token costs next to nothing: no large body read, no repeated query.

Through real HTTP against a real PostgreSQL. The database's own statement log is the
witness of what the server asked it: the test database logs every statement
(``log_statement = 'all'``, set on that database only), and a token lookup is the one
statement whose parameter is that token's sha256. "The body was not read" is judged from
the client's side of the socket: a client pushing a 40 MB body must get its answer and
then lose the connection while most of the body is still unsent (a server that reads the
body takes all of it before answering).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from pathlib import Path

import msgspec
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from fedrpc.app import SERVICES, create_app
from fedrpc.auth import (
    DEVICE_TOKEN_PREFIX,
    ORG_KEY_PREFIX,
    TOKEN_SHAPE,
    RateLimiter,
    UnknownTokens,
    client_address,
    client_key,
    new_token,
    parse_networks,
)
from fedrpc.settings import SettingsError, settings_from_env
from tests.conftest import RpcClient, register_device

MB = 1 << 20
BIG = 40 * MB
PING = {"jsonrpc": "2.0", "method": "system.ping", "id": 1}
VERSION = {"jsonrpc": "2.0", "method": "system.version", "id": 1}
STATEMENT = re.compile(rb" LOG:  (?:execute|statement)\b")


def unknown_token(prefix: str = "fk_") -> str:
    """A token of the shape we issue that no database row holds."""
    return prefix + secrets.token_urlsafe(32)


class StatementLog:
    """PostgreSQL's log of the statements run in the test database, read from an offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mark()

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def text(self) -> bytes:
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            return log.read()

    def lookups_of(self, token: str) -> int:
        """Statements since the mark whose parameter was this token's hash."""
        digest = hashlib.sha256(token.encode()).hexdigest().encode()
        return self.text().count(b"\\x" + digest)

    def statements(self) -> int:
        return len(STATEMENT.findall(self.text()))

    async def settle(self) -> None:
        """Wait until nothing has been logged for 0.2 s (the start-up's background pass)."""
        size, deadline = -1, time.monotonic() + 5
        while time.monotonic() < deadline and self.path.stat().st_size != size:
            size = self.path.stat().st_size
            await asyncio.sleep(0.2)
        self.mark()


@pytest.fixture
def statement_log(services, database_url) -> StatementLog:
    name = conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(services.admin_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {name} SET log_statement = 'all'")
        data_dir = conn.execute("SHOW data_directory").fetchone()[0]
    path = Path(data_dir) / "log"  # pgserver starts PostgreSQL with `pg_ctl -l DATA/log`
    assert path.is_file(), f"no PostgreSQL log at {path}"
    return StatementLog(path)


@pytest.fixture
def make_client(aiohttp_client, settings):
    async def make(**changes) -> RpcClient:
        return RpcClient(
            await aiohttp_client(create_app(msgspec.structs.replace(settings, **changes)))
        )

    return make


async def org_token(client: RpcClient) -> str:
    from fedrpc.admin import create_org

    return (await create_org(client.app[SERVICES].db, "org-" + secrets.token_hex(4)))[1]


async def post(client: RpcClient, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
    resp = await client.http.post(
        "/rpc",
        data=msgspec.json.encode(body),
        headers={"Content-Type": "application/json", **headers},
    )
    return resp.status, await resp.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- a large body is refused unread -------------------------------------------------------------


class Pushed(msgspec.Struct):
    status: int
    answer: dict
    sent_when_answered: int  # body bytes the socket had taken when the answer was complete
    sent: int  # body bytes the socket took before the connection ended (or all of them)


async def push_body(port: int, headers: dict[str, str], size: int, chunked: bool) -> Pushed:
    """POST a ``size``-byte body as fast as the server takes it, reading the answer meanwhile."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = ["POST /rpc HTTP/1.1", "Host: test", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())

    async def answer() -> tuple[int, dict]:
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, msgspec.json.decode(await reader.readexactly(length))

    answering = asyncio.create_task(answer())
    piece = b" " * (256 * 1024)
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
    sent, sent_when_answered = 0, None
    try:
        while sent < size and not writer.transport.is_closing():
            writer.write(frame)
            await asyncio.wait_for(writer.drain(), 10)
            sent += len(piece)
            if answering.done() and sent_when_answered is None:
                sent_when_answered = sent
    except (ConnectionResetError, BrokenPipeError):
        pass
    status, body = await asyncio.wait_for(answering, 10)
    writer.close()
    return Pushed(status, body, sent if sent_when_answered is None else sent_when_answered, sent)


@pytest.mark.parametrize(
    ("token", "chunked", "status", "type_"),
    [
        (None, False, 413, "payload_too_large"),
        (None, True, 413, "payload_too_large"),  # no declared length: refused past the limit
        ("unknown", False, 401, "unauthorized"),
    ],
    ids=["no token", "no token, chunked", "unknown token"],
)
async def test_a_40_mb_body_without_a_valid_token_is_refused_unread(
    make_client, statement_log, token, status, type_, chunked
):
    client = await make_client()
    await statement_log.settle()
    headers = bearer(unknown_token()) if token else {}

    pushed = await push_body(client.http.server.port, headers, BIG, chunked)

    assert pushed.status == status and pushed.answer["error"]["data"]["type"] == type_
    # Answered at once, then the connection dropped with most of the body never taken: a
    # server that read the body would have taken all 40 MB before answering.
    assert pushed.sent_when_answered < BIG // 4, pushed
    assert pushed.sent < BIG // 2, pushed
    if token:
        assert statement_log.lookups_of(headers["Authorization"][7:]) == 1


@pytest.mark.parametrize(
    ("token", "first_line"),
    [("unknown", b"HTTP/1.1 401"), (None, b"HTTP/1.1 413"), ("valid", b"HTTP/1.1 100 Continue")],
)
async def test_100_continue_is_sent_only_to_a_caller_that_may_send_its_body(
    make_client, token, first_line
):
    client = await make_client()
    tokens = {"unknown": unknown_token(), "valid": await org_token(client)}
    reader, writer = await asyncio.open_connection("127.0.0.1", client.http.server.port)
    head = ["POST /rpc HTTP/1.1", "Host: test", f"Content-Length: {BIG}", "Expect: 100-continue"]
    if token:
        head.append(f"Authorization: Bearer {tokens[token]}")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    # Nothing of the body is sent: a refused caller learns it before sending any.
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(first_line)
    writer.close()


async def test_a_small_public_call_without_a_token_still_works(make_client):
    client = await make_client()
    resp, body = await client.post([VERSION, {**VERSION, "id": 2}])
    assert resp.status == 200 and [b["result"]["openrpc"] for b in body] == ["1.3.2"] * 2
    # A body over the unauthenticated limit is refused, with the limit named.
    resp, body = await client.post({**VERSION, "params": {"x": "a" * 70_000}})
    assert resp.status == 413
    assert "without a token" in body["error"]["data"]["message"], body
    assert "65536" in body["error"]["data"]["message"]


# -- unknown tokens are remembered --------------------------------------------------------------


@pytest.mark.parametrize(("remember", "lookups"), [(30.0, 1), (0.0, 2)])
async def test_an_unknown_token_sent_again_is_not_looked_up_again(
    make_client, statement_log, remember, lookups
):
    client = await make_client(unknown_token_cache_seconds=remember)
    await statement_log.settle()
    token = unknown_token("fd_")
    # Ten at once share one lookup; one more afterwards is refused from memory.
    answers = await asyncio.gather(*(post(client, PING, bearer(token)) for _ in range(10)))
    answers.append(await post(client, PING, bearer(token)))
    assert {(status, body["error"]["data"]["type"]) for status, body in answers} == {
        (401, "unauthorized")
    }
    assert statement_log.lookups_of(token) == lookups
    # Without a token, or with one that cannot be ours, the database is not asked at all.
    statement_log.mark()
    for headers in ({}, bearer("fk_short"), bearer("xx_" + "a" * 43), {"Authorization": "Basic x"}):
        status, _ = await post(client, PING, headers)
        assert status == 401
    assert (await post(client, VERSION, {}))[0] == 200
    assert statement_log.statements() == 0, statement_log.text().decode()


async def test_a_token_revoked_after_its_first_use_is_remembered_as_unknown(
    make_client, statement_log
):
    client = await make_client()
    token = await org_token(client)
    device = await register_device(client, token)
    await client.ok("devices.revoke", {"device_id": device["device_id"]}, token)
    await statement_log.settle()
    for _ in range(3):
        status, _ = await post(client, PING, bearer(device["token"]))
        assert status == 401
    assert statement_log.lookups_of(device["token"]) == 1


# -- the per-address limit comes before the lookup ----------------------------------------------


async def test_lookups_are_limited_per_address_before_they_run(make_client, statement_log):
    client = await make_client(
        token_lookup_burst=3, token_lookups_per_second=0.01, auth_cache_seconds=60.0
    )
    admin = await org_token(client)
    await client.ok("system.ping", token=admin)  # cached from now on
    await statement_log.settle()
    tokens = [unknown_token() for _ in range(6)]
    statuses = []
    for i, token in enumerate(tokens):
        # X-Forwarded-For is not believed without FEDRPC_TRUSTED_PROXIES: one address.
        status, body = await post(client, PING, {**bearer(token), "X-Forwarded-For": f"10.0.0.{i}"})
        statuses.append(status)
    assert statuses == [401, 401, 401, 429, 429, 429]
    assert (
        body["error"]["data"]["type"] == "rate_limited"
        and body["error"]["data"]["retry_after"] >= 1
    )
    assert [statement_log.lookups_of(t) for t in tokens] == [1, 1, 1, 0, 0, 0]
    # A caller whose token is already known is not held up by its neighbours.
    assert (await post(client, PING, bearer(admin)))[0] == 200


async def test_lookups_that_find_their_token_are_given_back(make_client):
    client = await make_client(token_lookup_burst=2, token_lookups_per_second=0.01)
    admin = await org_token(client)  # the test settings cache nothing: every call looks up
    for _ in range(10):
        await client.ok("system.ping", token=admin)
    assert len(client.app[SERVICES].auth.lookup_limiter) == 1


async def test_the_64s_of_one_ipv6_48_share_a_bounded_lookup_budget(make_client, statement_log):
    # A /48 is cheap to get: cycling its 65,536 /64s must not multiply the lookup budget.
    from fedrpc.auth import SITE_SHARE

    client = await make_client(
        trusted_proxies="127.0.0.1", token_lookup_burst=2, token_lookups_per_second=0.01
    )
    await statement_log.settle()
    looked_up = 0
    for i in range(40):
        forwarded = {"X-Forwarded-For": f"2001:db8:7:{i:x}::1"}
        status, _ = await post(client, PING, {**bearer(unknown_token()), **forwarded})
        looked_up += status == 401
    assert looked_up == 2 * SITE_SHARE  # the /48 earns SITE_SHARE budgets of 2, not 40
    # Another site keeps its own budget.
    other = {"X-Forwarded-For": "2001:db8:8::1"}
    assert (await post(client, PING, {**bearer(unknown_token()), **other}))[0] == 401


# -- every structure is bounded -----------------------------------------------------------------


async def test_a_flood_of_addresses_and_tokens_stays_within_the_bounds(make_client):
    client = await make_client(
        trusted_proxies="127.0.0.1", rate_limit_max_clients=50, unknown_token_cache_size=40
    )
    auth, limiter = client.app[SERVICES].auth, client.app[SERVICES].limiter
    for i in range(300):
        forwarded = {"X-Forwarded-For": f"198.51.{i // 250}.{i % 250}"}
        assert (await post(client, PING, {**bearer(unknown_token()), **forwarded}))[0] == 401
        assert (await post(client, VERSION, forwarded))[0] == 200
    assert len(auth.lookup_limiter) == 50 and len(limiter) == 50
    assert len(auth.unknown) == 40


def test_the_limiter_drops_the_least_recently_used_and_keeps_its_speed():
    limiter = RateLimiter(rate=1.0, burst=2, max_keys=1000)
    started = time.perf_counter()
    for i in range(200_000):
        limiter.take(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert time.perf_counter() - started < 2.0  # constant time per key, evictions included
    assert len(limiter) == 1000
    limiter.take("kept", 2.0)
    for i in range(999):
        limiter.take(f"other-{i}")
        limiter.take("kept", 0.0)  # used: stays while the others come and go
    assert limiter.take("kept") > 0  # its bucket (empty) was never dropped


def test_unknown_tokens_expire_and_are_bounded():
    unknown = UnknownTokens(ttl=10.0, max_size=100)
    for i in range(1000):
        unknown.add(f"t{i}", now=float(i) / 1000)
    assert len(unknown) == 100 and unknown.has("t999", 1.0) and not unknown.has("t0", 1.0)
    assert not unknown.has("t999", 12.0)
    unknown.add("late", now=50.0)  # the expired ones go as new ones come
    assert len(unknown) == 1


# -- client addresses ---------------------------------------------------------------------------


def test_the_client_address_comes_from_trusted_proxies_only():
    proxies = parse_networks("10.0.0.0/8, ::1")
    xff = ["6.6.6.6, 203.0.113.9", "10.1.2.3"]  # the client wrote 6.6.6.6; a proxy chain follows
    assert client_address("10.0.0.1", xff, proxies) == "203.0.113.9"
    assert client_address("198.51.100.7", xff, proxies) == "198.51.100.7"  # not a proxy
    assert client_address("10.0.0.1", [], proxies) == "10.0.0.1"
    assert client_address("10.0.0.1", ["garbage"], proxies) == "10.0.0.1"
    assert client_address("10.0.0.1", xff, ()) == "10.0.0.1"


def test_every_token_we_issue_has_the_shape_that_earns_a_lookup():
    for prefix in (ORG_KEY_PREFIX, DEVICE_TOKEN_PREFIX):
        assert all(TOKEN_SHAPE.fullmatch(new_token(prefix)[0]) for _ in range(200))


def test_ipv6_clients_are_limited_by_their_64_bit_prefix():
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1" == client_key("192.0.2.1")
    assert client_key(None) == "local"


@pytest.mark.parametrize("value", ["proxy.internal", "10.0.0.300", "10.0.0.0/33"])
def test_trusted_proxies_that_are_not_addresses_are_refused_at_start(value):
    with pytest.raises(SettingsError, match="^FEDRPC_TRUSTED_PROXIES="):
        settings_from_env({"FEDRPC_TRUSTED_PROXIES": value})


# -- /metrics, system.version, rpc.discover -----------------------------------------------------


async def test_metrics_with_a_token_set_need_that_token(make_client):
    client = await make_client(metrics_token="scrape-" + "x" * 20)
    await client.ok("system.version")
    for headers in (
        {},
        bearer("scrape-" + "y" * 20),
        bearer("scrape-"),
        {"Authorization": "scrape-" + "x" * 20},
    ):
        resp = await client.http.get("/metrics", headers=headers)
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert "fedrpc_calls" not in await resp.text()
    # A header that is not UTF-8 is a wrong token too, not a server fault.
    raw = await raw_get(client.http.server.port, b"/metrics", b"Authorization: Bearer \xff\xfe")
    assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
    resp = await client.http.get("/metrics", headers=bearer("scrape-" + "x" * 20))
    assert resp.status == 200
    assert 'fedrpc_calls_total{method="system.version",outcome="ok"} 1.0' in await resp.text()


async def test_system_version_names_the_api_version_only(make_client):
    import platform

    import torch

    client = await make_client()
    result = await client.ok("system.version")
    assert set(result) == {"version", "openrpc"}
    document = await client.ok("rpc.discover")
    schema = document["components"]["schemas"]["VersionResult"]
    assert set(schema["properties"]) == {"version", "openrpc"}
    text = msgspec.json.encode(result).decode()
    assert torch.__version__ not in text and platform.python_version() not in text


async def test_rpc_discover_serves_the_document_built_at_start(make_client, monkeypatch):
    import fedrpc.openrpc
    from fedrpc.app import OPENRPC

    client = await make_client()
    served = await (await client.http.get("/openrpc.json")).json()
    document, spliced = client.app[OPENRPC], []
    encoded = document.encoded

    def spy(url: str) -> bytes:
        spliced.append(url)
        return encoded(url)

    def rebuilt(*args, **kwargs):
        raise AssertionError("the OpenRPC document was built again")

    monkeypatch.setattr(document, "encoded", spy)
    monkeypatch.setattr(fedrpc.openrpc, "build_document", rebuilt)
    for _ in range(2):
        assert await client.ok("rpc.discover") == served
    # Both calls were answered with the app's encoded document (its bytes, server URL spliced).
    assert spliced == [served["servers"][0]["url"]] * 2


async def raw_get(port: int, path: bytes, header: bytes) -> bytes:
    """A GET with one header sent as raw bytes (aiohttp's client would encode it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header)
    writer.write(b"\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


async def test_one_valid_token_spelled_many_ways_is_one_lookup(make_client, statement_log):
    # The cache is keyed by the token, not the header as sent: a device cannot turn its one
    # valid token into a lookup per request (and a cache entry each) by varying the spelling.
    from fedrpc.auth import hash_token

    client = await make_client(auth_cache_seconds=60.0)
    token = await org_token(client)
    await statement_log.settle()
    spellings = [
        f"{scheme}{' ' * n}{token}" for n in range(1, 40) for scheme in ("Bearer", "bEaReR")
    ]
    for header in spellings:
        status, _ = await post(client, PING, {"Authorization": header})
        assert status == 200
    assert statement_log.lookups_of(token) == 1
    cached = client.app[SERVICES].auth._cache
    assert [h for h in cached if hash_token(h.split()[-1]) == hash_token(token)] == [
        f"Bearer {token}"
    ]


async def test_a_principal_over_its_rate_is_refused_before_its_body_is_read(make_client):
    client = await make_client(rate_limit_per_second=0.01, rate_limit_burst=2)
    token = await org_token(client)
    for _ in range(2):
        assert (await post(client, PING, bearer(token)))[0] == 200

    pushed = await push_body(client.http.server.port, bearer(token), BIG, chunked=False)

    assert pushed.status == 429 and pushed.answer["error"]["data"]["type"] == "rate_limited"
    assert pushed.sent_when_answered < BIG // 4, pushed
