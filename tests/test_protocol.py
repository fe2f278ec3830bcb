"""The JSON-RPC 2.0 envelope, over real HTTP: the specification's examples and our limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fedrpc.app import REGISTRY, create_app
from fedrpc.registry import PUBLIC, Registry, rpc_method, spec_for
from schemas._base import Params, Result
from tests.conftest import RpcClient

SPEC_CALLS: list[str] = []
# Vendored (Apache-2.0, see its NOTICE): a clone of this repository has everything it tests with.
META_SCHEMA = Path(__file__).resolve().parent / "vendor/openrpc/openrpc-1.3-meta-schema.json"


class SubtractParams(Params):
    minuend: int
    subtrahend: int


class ManyInts(Params):
    a: int = 0
    b: int = 0
    c: int = 0
    d: int = 0
    e: int = 0


class NoParams(Params):
    pass


class Number(Result):
    value: int


@rpc_method(PUBLIC)
async def subtract(ctx, p: SubtractParams) -> int:
    return p.minuend - p.subtrahend


@rpc_method(PUBLIC)
async def sum_(ctx, p: ManyInts) -> int:
    return p.a + p.b + p.c + p.d + p.e


@rpc_method(PUBLIC)
async def update(ctx, p: ManyInts) -> None:
    SPEC_CALLS.append("update")


@rpc_method(PUBLIC)
async def notify_hello(ctx, p: ManyInts) -> None:
    SPEC_CALLS.append("notify_hello")


@rpc_method(PUBLIC)
async def get_data(ctx, p: NoParams) -> list[Any]:
    return ["hello", 5]


@rpc_method(PUBLIC)
async def explode(ctx, p: NoParams) -> None:
    raise RuntimeError("secret-db-password=hunter2")


def spec_registry() -> Registry:
    registry = Registry.from_package()
    for name, fn in [
        ("subtract", subtract),
        ("sum", sum_),
        ("update", update),
        ("notify_hello", notify_hello),
        ("notify_sum", sum_),
        ("get_data", get_data),
        ("explode", explode),
    ]:
        registry.add(spec_for(name, fn))
    return registry


@pytest.fixture
async def spec_client(aiohttp_client, settings) -> RpcClient:
    return RpcClient(await aiohttp_client(create_app(settings, spec_registry())))


# Section 7 of the JSON-RPC 2.0 specification, request -> expected answer (None: no answer).
SPEC_EXAMPLES = [
    (
        '{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}',
        {"jsonrpc": "2.0", "result": 19, "id": 1},
    ),
    (
        '{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}',
        {"jsonrpc": "2.0", "result": -19, "id": 2},
    ),
    (
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, "id": 3}',
        {"jsonrpc": "2.0", "result": 19, "id": 3},
    ),
    (
        '{"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23}, "id": 4}',
        {"jsonrpc": "2.0", "result": 19, "id": 4},
    ),
    ('{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}', None),
    ('{"jsonrpc": "2.0", "method": "foobar"}', None),
    (
        '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "1"},
    ),
    (
        '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
        {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None},
    ),
    (
        '{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
        {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
    ),
    (
        '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"}, {"jsonrpc": "2.0", "method"]',
        {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None},
    ),
    ("[]", {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}),
    (
        "[1]",
        [{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}],
    ),
    (
        "[1,2,3]",
        [{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None}]
        * 3,
    ),
    (
        """[
        {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "get_data", "id": "9"}
    ]""",
        [
            {"jsonrpc": "2.0", "result": 7, "id": "1"},
            {"jsonrpc": "2.0", "result": 19, "id": "2"},
            {"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": None},
            {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "5"},
            {"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"},
        ],
    ),
    (
        """[
        {"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}
    ]""",
        None,
    ),
]


def _without_data(answer: Any) -> Any:
    """The spec's examples leave error data open; ours is checked elsewhere."""
    if isinstance(answer, list):
        return [_without_data(a) for a in answer]
    if isinstance(answer, dict) and "error" in answer:
        assert set(answer["error"]["data"]) >= {"type", "message", "request_id"}
        return {**answer, "error": {k: v for k, v in answer["error"].items() if k != "data"}}
    return answer


@pytest.mark.parametrize(("request_text", "expected"), SPEC_EXAMPLES)
async def test_specification_examples_get_the_specified_answers(
    spec_client, request_text, expected
):
    resp, body = await spec_client.post(request_text.encode(), raw=True)
    if expected is None:
        assert resp.status == 204 and body is None
    else:
        assert resp.status == 200
        assert _without_data(body) == expected


async def test_notifications_run_their_handler(spec_client):
    SPEC_CALLS.clear()
    await spec_client.post(
        b'{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}', raw=True
    )
    assert SPEC_CALLS == ["update"]


@pytest.mark.parametrize("id_", ["abc", 7, 0, -3, 2.5, None, "", 10**15])
async def test_ids_are_echoed_with_their_type(spec_client, id_):
    body = await spec_client.call("subtract", [5, 2], id_=id_)
    assert body["id"] == id_ and type(body["id"]) is type(id_)


@pytest.mark.parametrize(
    ("bad", "echoed_id"),
    [
        ('{"jsonrpc": "1.0", "method": "get_data", "id": 1}', 1),
        ('{"method": "get_data", "id": 1}', 1),
        ('{"jsonrpc": "2.0", "method": "get_data", "id": {"a": 1}}', None),
        ('{"jsonrpc": "2.0", "method": "get_data", "id": true}', None),
        ('{"jsonrpc": "2.0", "method": "get_data", "params": 3, "id": 1}', 1),
        ('"just a string"', None),
        ("42", None),
    ],
)
async def test_malformed_request_objects_are_invalid_requests(spec_client, bad, echoed_id):
    _, body = await spec_client.post(bad.encode(), raw=True)
    assert body["error"]["code"] == -32600 and body["error"]["data"]["type"] == "bad_request"
    # The id is echoed when it could be read, null otherwise (spec section 5).
    assert body["id"] == echoed_id


async def test_invalid_params_name_the_failing_field(spec_client):
    error = (await spec_client.call("subtract", {"minuend": "x", "subtrahend": 1}))["error"]
    assert error["code"] == -32602
    assert error["data"]["path"] == "$.minuend" and error["data"]["type"] == "bad_request"
    missing = (await spec_client.call("subtract", {"minuend": 1}))["error"]
    assert missing["code"] == -32602 and "subtrahend" in missing["data"]["message"]
    extra = (await spec_client.call("subtract", {"minuend": 1, "subtrahend": 2, "zzz": 3}))["error"]
    assert extra["code"] == -32602 and "zzz" in extra["data"]["message"]
    too_many = (await spec_client.call("subtract", [1, 2, 3]))["error"]
    assert too_many["code"] == -32602


async def test_internal_errors_hide_the_exception_text(spec_client):
    resp, body = await spec_client.post({"jsonrpc": "2.0", "method": "explode", "id": 1})
    assert body["error"]["code"] == -32603 and body["error"]["data"]["type"] == "internal_error"
    assert "hunter2" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)


async def test_batches_longer_than_the_limit_are_refused(spec_client):
    batch = [{"jsonrpc": "2.0", "method": "get_data", "id": i} for i in range(101)]
    _, body = await spec_client.post(batch)
    assert body["error"]["data"]["type"] == "bad_request"
    _, body = await spec_client.post(batch[:100])
    assert len(body) == 100 and all(b["result"] == ["hello", 5] for b in body)


async def test_oversized_bodies_get_413_and_a_jsonrpc_error(aiohttp_client, settings):
    small = msgspec.structs.replace(settings, max_body_bytes=1024)
    client = RpcClient(await aiohttp_client(create_app(small)))
    too_big = {"jsonrpc": "2.0", "method": "system.version", "id": 1, "params": {"x": "a" * 2000}}
    resp, body = await client.post(too_big)
    assert resp.status == 413 and body["error"]["data"]["type"] == "payload_too_large"
    # With a token the same limit holds (the declared length is refused before reading).
    from fedrpc.admin import create_org
    from fedrpc.app import SERVICES

    _, token = await create_org(client.app[SERVICES].db, "big-bodies")
    resp, body = await client.post(too_big, token)
    assert resp.status == 413 and body["error"]["data"]["type"] == "payload_too_large"
    assert "exceeds 1024 bytes" in body["error"]["data"]["message"]


async def test_calls_without_a_token_get_401(client):
    resp, body = await client.post({"jsonrpc": "2.0", "method": "system.ping", "id": 1})
    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    assert body["error"]["data"]["type"] == "unauthorized"
    resp, body = await client.post(
        {"jsonrpc": "2.0", "method": "system.ping", "id": 1}, token="fk_not-a-real-key"
    )
    assert resp.status == 401 and body["error"]["data"]["type"] == "unauthorized"


async def test_public_methods_need_no_token(client):
    assert (await client.ok("system.version"))["openrpc"] == "1.3.2"


async def test_rate_limit_answers_429_with_retry_after(aiohttp_client, settings, make_org):
    tight = msgspec.structs.replace(settings, rate_limit_per_second=0.5, rate_limit_burst=3)
    client = RpcClient(await aiohttp_client(create_app(tight)))
    from fedrpc.admin import create_org
    from fedrpc.app import SERVICES

    _, token = await create_org(client.app[SERVICES].db, "limited")
    statuses = []
    for _ in range(4):
        resp, body = await client.post({"jsonrpc": "2.0", "method": "system.ping", "id": 1}, token)
        statuses.append(resp.status)
    assert statuses == [200, 200, 200, 429]
    assert int(resp.headers["Retry-After"]) >= 1
    assert (
        body["error"]["data"]["type"] == "rate_limited"
        and body["error"]["data"]["retry_after"] >= 1
    )


async def test_openrpc_document_is_valid_and_lists_every_method(client):
    document = await client.ok("rpc.discover")
    served = await (await client.http.get("/openrpc.json")).json()
    assert served == document
    validate_openrpc(document)
    assert {m["name"] for m in document["methods"]} == set(client.app[REGISTRY].methods)
    assert all(m["summary"] and m["errors"] for m in document["methods"])


async def test_openrpc_server_url_is_the_address_the_server_listens_on(client):
    origin = str(client.http.make_url("/")).rstrip("/")  # http://127.0.0.1:PORT
    document = await client.ok("rpc.discover")
    assert document["servers"] == [{"name": "fedrpc", "url": origin + "/rpc"}]
    resp = await client.http.get("/openrpc.json")
    assert (await resp.json())["servers"] == document["servers"]
    validate_openrpc(document)


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example",
        "attacker.example:8443",
        "127.0.0.1.attacker.example",
        'evil.com/"><script>',
        "user@evil.com",
        "x" * 400,
        "[::1",
    ],
    ids=["name", "name and port", "lookalike", "markup", "userinfo", "too long", "open bracket"],
)
async def test_a_host_header_never_reaches_the_openrpc_document(client, host):
    """A client-chosen Host must not become the server an SDK sends its bearer token to."""
    own = str(client.http.make_url("/rpc"))
    headers = {"Host": host}
    _, discovered = await post_with_headers(client, "rpc.discover", headers)
    served = await client.http.get("/openrpc.json", headers=headers)
    assert discovered["result"]["servers"][0]["url"] == own
    assert (await served.json())["servers"][0]["url"] == own
    assert host not in (await served.text())


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
async def test_a_wildcard_listen_address_names_the_address_the_call_arrived_on(
    aiohttp_client, settings, wildcard
):
    everywhere = msgspec.structs.replace(settings, host=wildcard)
    client = RpcClient(await aiohttp_client(create_app(everywhere)))  # listens on 127.0.0.1
    own = str(client.http.make_url("/rpc"))
    _, discovered = await post_with_headers(client, "rpc.discover", {"Host": "attacker.example"})
    assert discovered["result"]["servers"][0]["url"] == own


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:9000/rpc"),
        ("::", "http://[::1]:9000/rpc"),
        ("fl.internal", "http://fl.internal:9000/rpc"),
        ("fe80::1%eth0", "http://[fe80::1]:9000/rpc"),
    ],
)
def test_without_a_connection_the_server_url_is_the_configured_listen_address(host, url):
    from fedrpc.openrpc import server_url
    from fedrpc.settings import Settings

    assert server_url(Settings(host=host, port=9000)) == url


async def test_the_openrpc_document_is_not_stored_by_caches(client):
    resp = await client.http.get("/openrpc.json")
    assert resp.headers["Cache-Control"] == "no-store"


async def post_with_headers(client: RpcClient, method: str, headers: dict[str, str]):
    envelope = msgspec.json.encode({"jsonrpc": "2.0", "method": method, "id": 1})
    resp = await client.http.post(
        "/rpc", data=envelope, headers={"Content-Type": "application/json", **headers}
    )
    return resp, await resp.json()


async def test_openrpc_server_url_comes_from_the_public_url_setting(aiohttp_client, settings):
    public = msgspec.structs.replace(settings, public_url="https://fl.example.com/api/")
    client = RpcClient(await aiohttp_client(create_app(public)))
    document = await client.ok("rpc.discover")
    served = await (await client.http.get("/openrpc.json", headers={"Host": "evil.com"})).json()
    assert document == served
    assert served["servers"] == [{"name": "fedrpc", "url": "https://fl.example.com/api/rpc"}]
    validate_openrpc(served)


@pytest.mark.parametrize("value", ["/rpc", "fl.example.com", "ftp://x", "https://a b"])
def test_a_public_url_that_is_not_absolute_http_is_refused_at_start(value):
    from fedrpc.settings import SettingsError, settings_from_env

    with pytest.raises(SettingsError, match="^FEDRPC_PUBLIC_URL="):
        settings_from_env({"FEDRPC_PUBLIC_URL": value})


def test_the_validator_refuses_a_relative_server_url():
    document = {
        "openrpc": "1.3.2",
        "info": {"title": "t", "version": "1"},
        "servers": [{"name": "fedrpc", "url": "/rpc"}],
        "methods": [],
    }
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="uri"):
        validate_openrpc(document)


def validate_openrpc(document: dict) -> None:
    """The vendored OpenRPC 1.3 meta-schema, with ``format: uri`` checked as the reference
    tooling (@open-rpc/schema-utils-js, through ajv-formats) does: a scheme is required."""
    import re
    from urllib.parse import urlsplit

    import jsonschema
    from referencing import Registry as RefRegistry
    from referencing import Resource
    from referencing.jsonschema import DRAFT7

    meta = json.loads(META_SCHEMA.read_text())
    draft7 = Resource.from_contents(
        jsonschema.Draft7Validator.META_SCHEMA, default_specification=DRAFT7
    )
    refs = RefRegistry().with_resource("https://meta.json-schema.tools", draft7)
    formats = jsonschema.FormatChecker(())

    @formats.checks("uri")
    def is_uri(value: object) -> bool:
        if not isinstance(value, str) or re.search(r"[\s<>\"{}|\\^`]", value):
            return False
        parts = urlsplit(value)
        return bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parts.scheme or "")) and (
            parts.scheme not in ("http", "https") or bool(parts.netloc)
        )

    jsonschema.Draft7Validator(meta, registry=refs, format_checker=formats).validate(document)


def test_nothing_in_the_repository_reads_outside_it():
    """A user's clone has nothing beside it: no tracked file may name the shared folder."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    shared = "shared"  # spelled apart so that this file does not name what it looks for
    needles = (f"../{shared}", f"{shared}/reference", f"{shared}/tools")
    offenders = []
    for name in tracked:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode(errors="replace")
        offenders += [name for needle in needles if needle in text]
    assert tracked and not offenders, offenders


async def test_health_readiness_and_metrics(client, org):
    assert (await client.http.get("/healthz")).status == 200
    ready = await client.http.get("/readyz")
    assert ready.status == 200 and await ready.json() == {"database": True, "storage": True}
    await client.ok("system.ping", token=org.token)
    text = await (await client.http.get("/metrics")).text()
    assert 'fedrpc_calls_total{method="system.ping",outcome="ok"} 1.0' in text
    assert "fedrpc_call_seconds_bucket" in text


@pytest.mark.parametrize(
    "route",
    [
        "direct",  # the handler alone receives call lines, as `fedrpc serve` sets it up
        "through logging",  # pytest's capture handlers sit on the root logger too
    ],
)
async def test_each_call_writes_one_json_log_line_without_secrets(client, org, route):
    import asyncio
    import io
    import logging

    from fedrpc.call_log import JsonFormatter, JsonLineHandler

    stream = io.StringIO()
    handler = JsonLineHandler(stream)
    handler.setFormatter(JsonFormatter())
    calls = logging.getLogger("fedrpc.calls")
    calls.addHandler(handler)
    level, propagate = calls.level, calls.propagate
    calls.setLevel(logging.INFO)
    calls.propagate = route != "direct"
    try:
        await client.ok("system.ping", None, org.token)
        await client.error("orgs.get", {"org_id": "org_" + "9" * 32}, org.token)
        await asyncio.sleep(0)
        handler.flush()
    finally:
        calls.removeHandler(handler)
        calls.setLevel(level)
        calls.propagate = propagate
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    keys = ["ts", "level", "logger", "msg", "method", "principal", "duration_ms", "request_id"]
    assert [list(x) for x in lines] == [[*keys, "outcome"], [*keys, "outcome", "code"]]
    assert all(
        (x["level"], x["logger"], x["msg"]) == ("info", "fedrpc.calls", "rpc.call") for x in lines
    )
    assert [(x["method"], x["outcome"]) for x in lines] == [
        ("system.ping", "ok"),
        ("orgs.get", "forbidden"),
    ]
    assert all(
        x["principal"] == f"org:{org.id}" and x["duration_ms"] >= 0 and len(x["request_id"]) == 16
        for x in lines
    )
    assert lines[1]["code"] == 4403
    assert org.token not in stream.getvalue()


async def test_an_id_too_large_for_64_bits_is_named_as_the_fault(spec_client):
    huge = b"9" * 5000
    single = b'{"jsonrpc": "2.0", "method": "get_data", "id": ' + huge + b"}"
    resp, body = await spec_client.post(single, raw=True)
    assert resp.status == 200 and body["error"]["code"] == -32600 and body["id"] is None
    assert "id" in body["error"]["data"]["message"]
    assert "object or array" not in body["error"]["data"]["message"]
    # In a batch only that member is refused; the others are answered.
    batch = b"[" + single + b', {"jsonrpc": "2.0", "method": "get_data", "id": 2}]'
    resp, body = await spec_client.post(batch, raw=True)
    assert resp.status == 200 and len(body) == 2, body
    refused, answered = sorted(body, key=lambda b: b["id"] is not None)
    assert refused["error"]["code"] == -32600 and "id" in refused["error"]["data"]["message"]
    assert answered == {"jsonrpc": "2.0", "result": ["hello", 5], "id": 2}
