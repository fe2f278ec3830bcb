"""Generated requests for every method, from the server's own OpenRPC document: nothing breaks it.

One real server over HTTP for the whole campaign, on the world of
tests/methods/test_no_leaks.py (a federation of two organizations, their devices, groups,
keys, rounds, updates, jobs, uploads and analytics rows). The params of every method
``rpc.discover`` lists are drawn by hypothesis from the method's params schema: valid
values (ids of the world's real objects among them), near-valid ones (a wrong type, an
extra or a missing field, positional params) and hostile ones anywhere in the tree (NUL
characters, lone surrogates as JSON escapes, invalid UTF-8 bytes, NaN and Infinity
tokens, 1e999, integers of 5000 digits or just past 64 bits, 10,000 levels of nesting,
arrays of 100,000 elements, strings far past their maxLength), sent as an org admin key
or a device token, alone, in batches or as notifications; a second campaign mangles the
envelope itself (garbage bodies, broken members, odd ids).

Every answer must be:

- valid JSON-RPC 2.0: a response object (or a batch of them) with ``jsonrpc``, an ``id``
  and exactly one of ``result``/``error``, or 204 when only notifications were sent; an
  error carries a code, a message and ``data`` with a known ``type`` that fits the code
  and the HTTP status;
- never ``-32603`` nor ``internal_error``: under generated input those are server faults;
- free of tracebacks, exception class names, psycopg names and SQL;
- a result that decodes as the method's declared result type.

And the server answers ``system.ping`` (both principals) and ``/readyz`` afterwards. The
campaign is bounded and derandomized here (hypothesis ``derandomize=True``, no example
database written); ``python bench/fuzz.py`` runs the same one for longer.

Violations known to be server bugs outside this file's reach are listed in KNOWN with
the bug they belong to; they are reported, not failed.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import http.client
import json
import math
import re
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from fedrpc.admin import create_org
from fedrpc.app import SERVICES, create_app
from fedrpc.errors import APP_ERRORS, PROTOCOL_MESSAGES
from fedrpc.registry import Registry
from tests.conftest import OrgHandle, RpcClient
from tests.methods.conftest import _bundle, inline
from tests.methods.test_no_leaks import build_world
from tests.methods.test_weights_upload import update_bytes

EXAMPLES_PER_METHOD = 24  # make test: about 1,800 generated calls in all
ENVELOPE_EXAMPLES = 150
MAX_BODY_BYTES = 4 * 1024 * 1024  # the campaign's server: a 4 MiB body cap, cheap to pass


@dataclass(frozen=True)
class Known:
    """A violation that is a known server bug, to be fixed where it lives: reported, not failed."""

    method: str
    kind: str
    sent: re.Pattern[bytes]  # matches the body of every request that shows it
    bug: str

    def covers(self, method: str, kind: str, body: bytes) -> bool:
        return (method, kind) == (self.method, self.kind) and self.sent.search(body) is not None


KNOWN: list[Known] = []

# --- what may appear in an answer ------------------------------------------------------------------

_TYPES_BY_CODE = {e.code: e.type for e in APP_ERRORS} | {
    -32700: "bad_request",
    -32600: "bad_request",
    -32601: "not_found",
    -32602: "bad_request",
    -32603: "internal_error",
}
_STATUS_BY_TYPE = {"unauthorized": 401, "payload_too_large": 413, "rate_limited": 429}
_EXCEPTION_NAMES = sorted(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException) and name != "Exception"
)
# Case-sensitive needles: our own messages never hold them; a leaked exception or query does.
NEEDLES = [
    "Traceback",
    'File "',
    "Exception",
    *_EXCEPTION_NAMES,
    "psycopg",
    "msgspec.",
    "jsonrpcserver",
    "Violation",
    "SELECT ",
    "INSERT INTO",
    "UPDATE ",
    "DELETE FROM",
    " WHERE ",
    "RETURNING",
    "syntax error",
    "violates ",
    'relation "',
    'column "',
    "DETAIL:",
    "CONTEXT:",
    "HINT:",
    "site-packages",
    ".py",
]

# --- hostile values ------------------------------------------------------------------------------
#
# Python values cannot hold what must be sent (NaN tokens, lone surrogates, invalid UTF-8,
# 10**5000), so the generator places markers that survive msgspec's encoder and the
# encoded body has them replaced: "@@RAW:name@@" (with its quotes) by a raw JSON value,
# "@@IN:name@@" inside a string by raw bytes.

RAW: dict[str, bytes] = {
    "nan": b"NaN",
    "inf": b"Infinity",
    "-inf": b"-Infinity",
    "1e999": b"1e999",
    "-1e999": b"-1e999",
    "1e-400": b"1e-400",
    "int_5000_digits": b"1" + b"0" * 5000,
    "neg_int_5000_digits": b"-1" + b"0" * 5000,
    "2**64": b"18446744073709551616",
    "-2**63-1": b"-9223372036854775809",
    "deep_array_10k": b"[" * 10_000 + b"]" * 10_000,
    "deep_object_10k": b'{"a":' * 10_000 + b"0" + b"}" * 10_000,
    "deep_array_100": b"[" * 100 + b"]" * 100,
    "deep_object_40": b'{"a":' * 40 + b"0" + b"}" * 40,
    "array_100k": b"[" + b"0," * 99_999 + b"0]",
    "object_20k": b"{" + b",".join(b'"k%d":1.5' % i for i in range(20_000)) + b"}",
    "string_1m": b'"' + b"a" * 1_000_000 + b'"',
    "bare_word": b"undefined",
    "leading_zero": b"01",
    "hex": b"0x1F",
    "plus": b"+1",
}
IN_STRING: dict[str, bytes] = {
    "lone_high": rb"\ud800",
    "lone_low": rb"\udfff",
    "reversed_pair": rb"\udc00\ud800",
    "high_then_char": rb"\ud800\u0041",
    "nul_escape": rb"\u0000",
    "bad_utf8": b"\xff\xfe",
    "overlong_utf8": b"\xc0\xaf",
    "utf8_surrogate": b"\xed\xa0\x80",
    "truncated_utf8": b"\xe2\x82",
    "raw_control": b"\x01\x1f",
    "bad_escape": rb"\x41",
}
_MARK = re.compile(rb'"@@RAW:([^@"]+)@@"|@@IN:([^@"]+)@@')


def materialize(body: bytes) -> bytes:
    """The encoded body with every marker replaced by the bytes it stands for."""
    if b"@@" not in body:
        return body
    return _MARK.sub(lambda m: RAW[m[1].decode()] if m[1] else IN_STRING[m[2].decode()], body)


def raw(name: str) -> str:
    return f"@@RAW:{name}@@"


def in_string(name: str) -> str:
    return f"@@IN:{name}@@"


_EDGE_INTS = [
    0,
    -1,
    2**31 - 1,
    2**31,
    -(2**31) - 1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    2**64 - 1,
    10**30,
    -(10**30),
]
_EDGE_FLOATS = [-0.0, 5e-324, 1e-300, 1e16, 1.7976931348623157e308, -1.7976931348623157e308, 0.5]


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=12)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def _hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds(
            lambda a, mark, b: a + in_string(mark) + b,
            st.text(max_size=4),
            st.sampled_from(sorted(IN_STRING)),
            st.text(max_size=4),
        ),
        st.text(max_size=6).map(lambda s: s + "\x00" + s),
        st.sampled_from(["", " ", "a" * 300, "a" * 100_000, "\u202e\ufeff", "\U0010ffff", "%s%n"]),
    )


HOSTILE: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(sorted(RAW)).map(raw),
    _hostile_text(),
    st.sampled_from(_EDGE_INTS),
    st.sampled_from(_EDGE_FLOATS),
    json_values(),
)


def weighted(*options: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, drawn in proportion to its weight."""
    table = [s for weight, s in options for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


# --- values from JSON Schema ---------------------------------------------------------------------

_ID_PATTERN = re.compile(r"^\^\(?([a-z|]+)\)?_\[0-9a-f\]\{32\}\$$")


@dataclass
class Pools:
    """Real values of the world that generated params draw from besides random ones."""

    ids: dict[str, list[str]]  # id prefix -> ids of real objects
    blobs: list[bytes]  # real payloads: an update, the model's weights, ONNX and program
    words: list[str]  # variable and metric names the world holds


class Generator:
    """Hypothesis strategies for the values a JSON Schema describes (the subset msgspec emits)."""

    def __init__(self, components: dict[str, Any], pools: Pools) -> None:
        self.components = components
        self.pools = pools
        self._refs: dict[tuple[str, bool], st.SearchStrategy[Any]] = {}

    def value(self, schema: dict[str, Any], hostile: bool) -> st.SearchStrategy[Any]:
        valid = self._valid(schema, hostile)
        if not hostile:
            return valid
        return weighted((7, valid), (1, HOSTILE))

    def _valid(self, schema: dict[str, Any], hostile: bool) -> st.SearchStrategy[Any]:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            key = (name, hostile)
            if key not in self._refs:
                self._refs[key] = st.deferred(lambda: self._valid(self.components[name], hostile))
            return self._refs[key]
        if "anyOf" in schema:
            return st.one_of([self.value(s, hostile) for s in schema["anyOf"]])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        if "const" in schema:
            return st.just(schema["const"])
        kind = schema.get("type")
        if isinstance(kind, list):
            return st.one_of([self._valid({**schema, "type": k}, hostile) for k in kind])
        if kind == "null":
            return st.none()
        if kind == "boolean":
            return st.booleans()
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "string":
            return self._string(schema)
        if kind == "array":
            items = self.value(schema.get("items", {}), hostile)
            low = schema.get("minItems", 0)
            return st.lists(
                items, min_size=low, max_size=min(schema.get("maxItems", low + 4), low + 4)
            )
        if kind == "object":
            return self._object(schema, hostile)
        return json_values()

    def _integer(self, schema: dict[str, Any]) -> st.SearchStrategy[int]:
        low, high = schema.get("minimum"), schema.get("maximum")
        if "exclusiveMinimum" in schema:
            low = int(schema["exclusiveMinimum"]) + 1
        if "exclusiveMaximum" in schema:
            high = int(schema["exclusiveMaximum"]) - 1
        inside = st.integers(min_value=low, max_value=high)
        edges = [v for v in (low, high, 1, 0) if v is not None and _within(v, low, high)]
        return weighted((4, inside), (1, st.sampled_from(edges))) if edges else inside

    def _number(self, schema: dict[str, Any]) -> st.SearchStrategy[float]:
        low, high = schema.get("minimum"), schema.get("maximum")
        exclude_min = exclude_max = False
        if "exclusiveMinimum" in schema:
            low, exclude_min = schema["exclusiveMinimum"], True
        if "exclusiveMaximum" in schema:
            high, exclude_max = schema["exclusiveMaximum"], True
        floats = st.floats(
            min_value=low,
            max_value=high,
            exclude_min=exclude_min,
            exclude_max=exclude_max,
            allow_nan=False,
            allow_infinity=False,
        )
        int_low = None if low is None else math.floor(low) + 1
        int_high = None if high is None else math.ceil(high) - 1
        if int_low is not None and int_high is not None and int_low > int_high:
            return floats
        return weighted((4, floats), (1, st.integers(min_value=int_low, max_value=int_high)))

    def _string(self, schema: dict[str, Any]) -> st.SearchStrategy[str]:
        if schema.get("contentEncoding") == "base64":
            return weighted(
                (2, st.sampled_from(self.pools.blobs)),
                (2, st.binary(max_size=64)),
                (1, st.text(max_size=8)),
            ).map(lambda v: base64.b64encode(v).decode() if isinstance(v, bytes) else v)
        if schema.get("format") == "date-time":
            moments = st.datetimes(
                min_value=datetime(1900, 1, 1),
                max_value=datetime(2200, 1, 1),
                timezones=weighted((4, st.just(UTC)), (1, st.none())),
            )
            return weighted(
                (3, moments.map(datetime.isoformat)), (1, st.just("2026-01-01T00:00:00Z"))
            )
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        pattern = schema.get("pattern")
        if pattern:
            found = _ID_PATTERN.match(pattern)
            if found:
                real = [i for prefix in found[1].split("|") for i in self.pools.ids.get(prefix, [])]
                random_ids = st.from_regex(pattern, fullmatch=True)
                return weighted((5, st.sampled_from(real)), (1, random_ids)) if real else random_ids
            matching = st.from_regex(pattern, fullmatch=True)
            words = [w for w in self.pools.words if re.fullmatch(pattern, w)]
            found_words = st.sampled_from(words) if words else matching
            return weighted((2, matching), (1, found_words)).filter(
                lambda s: len(s) >= low and (high is None or len(s) <= high)
            )
        text = st.text(min_size=low, max_size=max(low, min(high or 24, 24)))
        return weighted((3, text), (1, st.sampled_from(self.pools.words)))

    def _object(self, schema: dict[str, Any], hostile: bool) -> st.SearchStrategy[dict]:
        props = schema.get("properties")
        if props is not None:
            required = set(schema.get("required", []))
            return st.fixed_dictionaries(
                {k: self.value(v, hostile) for k, v in props.items() if k in required},
                optional={k: self.value(v, hostile) for k, v in props.items() if k not in required},
            )
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            names = schema.get("propertyNames")
            keys = self._string({"type": "string", **names}) if names else st.text(max_size=12)
            if hostile:
                keys = weighted((7, keys), (1, _hostile_text()))
            top = schema.get("maxProperties", 6)
            return st.dictionaries(keys, self.value(extra, hostile), max_size=min(top, 6))
        return st.dictionaries(st.text(max_size=8), json_values(), max_size=4)

    def params(self, method: dict[str, Any]) -> st.SearchStrategy[Any]:
        """Params for one method: valid, hostile inside, reshaped, or not an object at all."""
        fields = {p["name"]: p["schema"] for p in method["params"]}
        required = [p["name"] for p in method["params"] if p["required"]]
        shape = {"type": "object", "properties": fields, "required": required}
        valid = self._object(shape, hostile=False)
        hostile = self._object(shape, hostile=True)
        extra = st.tuples(hostile, st.text(min_size=1, max_size=10), HOSTILE).map(
            lambda t: {**t[0], t[1]: t[2]}
        )
        missing = (
            st.tuples(valid, st.sampled_from(required)).map(
                lambda t: {k: v for k, v in t[0].items() if k != t[1]}
            )
            if required
            else valid
        )
        order = list(fields)
        positional = hostile.map(lambda d: [d.get(name) for name in order if name in d])
        not_object = st.one_of(st.sampled_from(sorted(RAW)).map(raw), json_values(4))
        return weighted(
            (4, valid), (6, hostile), (1, extra), (1, missing), (1, positional), (1, not_object)
        )


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


# --- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    principal: str  # a key of Target.tokens, or "none"
    body: bytes
    note: str  # what was done to the envelope or the body
    batch: bool | None = False  # the body is a JSON array (None: mangled, either may be answered)
    ids: tuple[Any, ...] = ()  # the ids the server may echo (None always may)

    def show(self, limit: int = 400) -> str:
        text = self.body[:limit].decode(errors="backslashreplace")
        more = f" ... ({len(self.body)} bytes)" if len(self.body) > limit else ""
        return f"{self.method} as {self.principal} [{self.note}]: {text}{more}"


_IDS = [
    (12, st.integers(min_value=-(2**63), max_value=2**63 - 1)),
    (3, st.text(max_size=12)),
    (2, st.none()),
    (1, st.floats(allow_nan=False, allow_infinity=False)),
    (1, st.sampled_from([True, [], {}, raw("2**64"), raw("1e999"), raw("int_5000_digits")])),
]
ABSENT = object()


def _envelope(method: str, params: Any, id_: Any, jsonrpc: Any = "2.0") -> dict[str, Any]:
    env: dict[str, Any] = {"jsonrpc": jsonrpc, "method": method}
    if params is not ABSENT:
        env["params"] = params
    if id_ is not ABSENT:
        env["id"] = id_
    return env


def _ids_of(payload: Any) -> tuple[Any, ...]:
    """The ids of the payload's request objects as the server reads them. A marker id is the
    number it stands for when that is one Python reads too (2**64 is echoed; 1e999 and
    5000 digits are unusable ids, answered with null); an id holding bytes is unusable."""
    members = payload if isinstance(payload, list) else [payload]
    ids = []
    for m in members:
        if not isinstance(m, dict) or "id" not in m:
            continue
        id_ = m["id"]
        if isinstance(id_, str) and id_.startswith("@@RAW:"):
            try:
                id_ = json.loads(RAW[id_[6:-2]])
            except ValueError:
                continue
            if isinstance(id_, float) and not math.isfinite(id_):
                continue
        elif isinstance(id_, str) and "@@" in id_:
            continue
        ids.append(id_)
    return tuple(ids)


def _mangle(body: bytes, how: str, at: int) -> bytes:
    at = at % (len(body) + 1)
    return {
        "truncate": lambda: body[:at],
        "byte_ff": lambda: body[:at] + b"\xff" + body[at:],
        "bom": lambda: b"\xef\xbb\xbf" + body,
        "trailing": lambda: body + b" x",
        "nul_byte": lambda: body[:at] + b"\x00" + body[at:],
        "utf16": lambda: body.decode(errors="replace").encode("utf-16"),
        "duplicate_keys": lambda: (
            body[:-1] + b',"method":"system.ping","id":7}' if body.endswith(b"}") else body
        ),
    }[how]()


def method_requests(
    gen: Generator, method: dict[str, Any], principals: list[str]
) -> st.SearchStrategy[Request]:
    """One HTTP body for ``method``: mostly a request object, sometimes a batch or a notification
    (never for devices.rotate_token: its new token must be read), sometimes mangled bytes."""
    name = method["name"]
    params = weighted((30, gen.params(method)), (1, st.just(ABSENT)))
    ids = (
        weighted(*_IDS) if name == "devices.rotate_token" else weighted(*_IDS, (1, st.just(ABSENT)))
    )
    single = st.builds(lambda p, i: _envelope(name, p, i), params, ids)
    batch = st.lists(single, min_size=2, max_size=4)
    with_garbage = st.tuples(single, HOSTILE).map(lambda t: [t[0], t[1]])
    payload = weighted((16, single), (2, batch), (1, with_garbage))
    mangle = weighted(
        (24, st.just(None)),
        (
            1,
            st.sampled_from(
                ["truncate", "byte_ff", "bom", "trailing", "nul_byte", "utf16", "duplicate_keys"]
            ),
        ),
    )

    def build(payload: Any, principal: str, how: str | None, at: int) -> Request:
        body = materialize(msgspec.json.encode(payload))
        batch = body.startswith(b"[")
        if how is not None:
            body = _mangle(body, how, at)
        kind = "batch" if batch else "notification" if "id" not in payload else "call"
        note = kind if how is None else f"{kind}, {how}"
        ids = _ids_of(payload) + ((7,) if how == "duplicate_keys" else ())
        return Request(name, principal, body, note, batch=batch if how is None else None, ids=ids)

    return st.builds(build, payload, st.sampled_from(principals), mangle, st.integers(0, 1 << 16))


def envelope_requests(method_names: list[str], principals: list[str]) -> st.SearchStrategy[Request]:
    """Bodies that are not well-formed requests: any JSON, broken members, odd envelopes."""
    names = st.sampled_from(method_names)
    odd = st.builds(
        lambda jsonrpc, method, params, id_: {
            k: v
            for k, v in (("jsonrpc", jsonrpc), ("method", method), ("params", params), ("id", id_))
            if v is not ABSENT
        },
        weighted((3, st.just("2.0")), (1, st.just(ABSENT)), (1, HOSTILE)),
        weighted((3, names), (1, st.just(ABSENT)), (1, HOSTILE), (1, st.text(max_size=200))),
        weighted((2, st.just(ABSENT)), (2, st.just({})), (1, HOSTILE)),
        weighted(*_IDS, (1, st.just(ABSENT))),
    )
    member = weighted((3, odd), (1, HOSTILE))
    payload = weighted(
        (4, odd),
        (2, st.lists(member, min_size=0, max_size=5)),
        (
            1,
            st.lists(
                st.just({"jsonrpc": "2.0", "method": "system.ping", "id": 1}),
                min_size=101,
                max_size=101,
            ),
        ),
        (1, HOSTILE),
    )

    def build(payload: Any, principal: str) -> Request:
        body = materialize(msgspec.json.encode(payload))
        batch = body.startswith(b"[")
        return Request("(envelope)", principal, body, "envelope", batch=batch, ids=_ids_of(payload))

    raw_bodies = st.sampled_from(
        [
            b"",
            b" ",
            b"{",
            b"[",
            b"[]",
            b"{}",
            b"null",
            b"\xff\xfe",
            b'{"jsonrpc":"2.0"',
            *RAW.values(),
        ]
    ).map(lambda body: Request("(envelope)", "org", body, "raw body", batch=None))
    return weighted((8, st.builds(build, payload, st.sampled_from(principals))), (1, raw_bodies))


# --- checking one answer ---------------------------------------------------------------------------


def check_answer(
    request: Request,
    status: int,
    content_type: str | None,
    data: bytes,
    result_types: dict[str, Any],
) -> tuple[list[tuple[str, str]], list[dict]]:
    """(violations as (kind, detail), the response objects) of one HTTP answer."""
    problems: list[tuple[str, str]] = []
    if status == 204:
        if data:
            problems.append(("204 with a body", data[:200].decode(errors="replace")))
        return problems, []
    if status not in (200, 401, 413, 429):
        problems.append(("unexpected HTTP status", str(status)))
    if not (content_type or "").startswith("application/json"):
        problems.append(("not application/json", str(content_type)))
    text = data.decode(errors="replace")
    sent = request.body.decode(errors="replace")
    for needle in NEEDLES:
        if needle in text and needle not in sent:
            at = text.index(needle)
            problems.append((f"leaks {needle!r}", text[max(0, at - 150) : at + 150]))
    try:
        decoded = msgspec.json.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        problems.append(("answer is not JSON", text[:300]))
        return problems, []
    objects = decoded if isinstance(decoded, list) else [decoded]
    if isinstance(decoded, list) and request.batch is False:
        problems.append(("a batch answer to a single request", text[:300]))
    if not objects:
        problems.append(("an empty batch answer", text[:300]))
    for obj in objects:
        in_batch = isinstance(decoded, list)  # one HTTP status for many answers: 200
        problems += _check_object(obj, status, in_batch, request, result_types)
    if request.note == "notification" and status == 200 and not _malformed(objects):
        problems.append(("an answer to a well-formed notification", text[:300]))
    return problems, [o for o in objects if isinstance(o, dict)]


def _malformed(objects: list[Any]) -> bool:
    """Whether the answer says the request could not be read (a notification then gets one)."""
    return all(
        isinstance(o, dict)
        and isinstance(o.get("error"), dict)
        and o["error"].get("code") in (-32700, -32600)
        for o in objects
    )


def _check_object(
    obj: Any, status: int, in_batch: bool, request: Request, result_types: dict[str, Any]
) -> list[tuple[str, str]]:
    shown = msgspec.json.encode(obj)[:300].decode(errors="replace")
    if not isinstance(obj, dict):
        return [("a response that is not an object", shown)]
    problems = []
    if (
        obj.get("jsonrpc") != "2.0"
        or "id" not in obj
        or set(obj) - {"jsonrpc", "id", "result", "error"}
    ):
        problems.append(("not a JSON-RPC 2.0 response object", shown))
    if ("result" in obj) == ("error" in obj):
        problems.append(("not exactly one of result and error", shown))
    if obj.get("id") is not None and obj.get("id") not in request.ids:
        problems.append(("an id that was not sent", shown))
    if "result" in obj:
        if status != 200:
            problems.append(("a result with HTTP status", f"{status}: {shown}"))
        result_type = result_types.get(request.method)
        if result_type is not None and request.note == "call":
            try:
                msgspec.json.decode(msgspec.json.encode(obj["result"]), type=result_type)
            except msgspec.ValidationError as exc:
                problems.append(("a result that does not fit its declared type", f"{exc}: {shown}"))
        return problems
    error = obj.get("error")
    if not isinstance(error, dict):
        return [*problems, ("an error that is not an object", shown)]
    code, data = error.get("code"), error.get("data")
    if not isinstance(code, int) or not isinstance(error.get("message"), str):
        problems.append(("an error without code or message", shown))
    if not isinstance(data, dict) or not isinstance(data.get("request_id"), str):
        return [*problems, ("an error without data.request_id", shown)]
    type_ = data.get("type")
    if code == -32603 or type_ == "internal_error":
        problems.append(("internal error", shown))
    elif _TYPES_BY_CODE.get(code) != type_:
        problems.append(("data.type does not fit the code", shown))
    if code in PROTOCOL_MESSAGES and error.get("message") != PROTOCOL_MESSAGES[code]:
        problems.append(("a protocol error with another message", shown))
    if _STATUS_BY_TYPE.get(type_, 200) != status and not in_batch:
        problems.append(("HTTP status does not fit data.type", f"{status}: {shown}"))
    return problems


# --- the campaign ----------------------------------------------------------------------------------


class Poster:
    """One keep-alive HTTP/1.1 connection, reopened when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, token: str | None) -> tuple[int, str | None, bytes]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            try:
                self._conn.request("POST", "/rpc", body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
                continue
            if resp.will_close:
                self.close()
            return resp.status, resp.getheader("Content-Type"), data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass
class Target:
    """The running server, the principals the campaign calls as, and the world's real values."""

    host: str
    port: int
    tokens: dict[str, str]  # principal -> bearer token: "org" (A's admin key), "device" (A's)
    device_id: str
    document: dict[str, Any]
    pools: Pools


@dataclass
class Report:
    calls: int = 0
    outcomes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    # (method, kind, known bug or "") -> (count, the shortest offending request, detail)
    violations: dict[tuple[str, str, str], tuple[int, Request, str]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, request: Request, kind: str, detail: str) -> None:
        bug = next((k.bug for k in KNOWN if k.covers(request.method, kind, request.body)), "")
        key = (request.method, kind, bug)
        count, first, shown = self.violations.get(key, (0, request, detail))
        if len(request.body) < len(first.body):
            first, shown = request, detail
        self.violations[key] = (count + 1, first, shown)

    def failures(self) -> list[str]:
        return self._lines(known=False)

    def known(self) -> list[str]:
        return self._lines(known=True)

    def _lines(self, known: bool) -> list[str]:
        lines = []
        for (method, kind, bug), (count, request, detail) in sorted(self.violations.items()):
            if bool(bug) != known:
                continue
            note = f" (known bug: {bug})" if bug else ""
            lines.append(
                f"{method}: {kind} x{count}{note}\n  sent {request.show()}\n  got {detail[:600]}"
            )
        return lines


class Campaign:
    """Hypothesis drives the requests; every answer is checked and counted, never shrunk."""

    def __init__(self, target: Target, *, derandomize: bool = True) -> None:
        self.target = target
        self.poster = Poster(target.host, target.port)
        self.report = Report()
        self.derandomize = derandomize
        self.gen = Generator(target.document["components"]["schemas"], target.pools)
        registry = Registry.from_package()
        self.result_types = {spec.name: spec.result_type for spec in registry}
        self.callers = {m["name"]: m["x-callers"] for m in target.document["methods"]}
        self._rotated: list[str] = []

    def send(self, request: Request) -> None:
        token = self.target.tokens.get(request.principal)
        try:
            status, ctype, data = self.poster.post(request.body, token)
        except (http.client.HTTPException, OSError) as exc:
            self.report.add(request, "no answer (connection failed)", type(exc).__name__)
            return
        self.report.calls += 1
        problems, objects = check_answer(request, status, ctype, data, self.result_types)
        for kind, detail in problems:
            self.report.add(request, kind, detail)
        for obj in objects:
            error = obj.get("error")
            outcome = error.get("data", {}).get("type", "?") if isinstance(error, dict) else "ok"
            self.report.outcomes[request.method][outcome] += 1
            self._follow_rotation(obj)
        if request.method == "devices.rotate_token" and request.principal == "device":
            self._keep_device_token()

    def _follow_rotation(self, obj: dict) -> None:
        """devices.rotate_token gave the campaign's device a new token: remember it."""
        result = obj.get("result")
        if isinstance(result, dict) and result.get("device_id") == self.target.device_id:
            token = result.get("token")
            if isinstance(token, str) and token.startswith("fd_"):
                self._rotated.append(token)

    def _keep_device_token(self) -> None:
        """After devices.rotate_token, call on with the device's live token: the newest answer
        is not always it (an idempotent replay returns the token the first call made)."""
        candidates = [self.target.tokens["device"], *reversed(self._rotated)]
        self._rotated.clear()
        ping = msgspec.json.encode({"jsonrpc": "2.0", "method": "system.ping", "id": 1})
        for token in candidates:
            status, _, _ = self.poster.post(ping, token)
            if status == 200:
                self.target.tokens["device"] = token
                return
        raise AssertionError("the campaign's device has no live token after devices.rotate_token")

    def _settings(self, examples: int) -> settings:
        return settings(
            max_examples=examples,
            deadline=None,
            derandomize=self.derandomize,
            database=None,
            phases=[Phase.explicit, Phase.generate],  # violations are collected, never shrunk
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )

    def principals_for(self, name: str) -> list[str]:
        """The principals a method is called as: mostly those it admits."""
        callers = set(self.callers[name])
        admitted = [p for p in ("org", "device") if p in callers]
        if "public" in callers:
            return ["none", "org", "device"]
        refused = [p for p in ("org", "device") if p not in admitted]
        return admitted * 3 + refused

    def run_method(self, method: dict[str, Any], examples: int) -> None:
        gen = self.gen
        if method["name"] == "devices.revoke":  # the campaign's own device keeps its token
            pools = self.target.pools
            ids = {**pools.ids, "dev": [i for i in pools.ids["dev"] if i != self.target.device_id]}
            gen = Generator(
                self.target.document["components"]["schemas"], Pools(ids, pools.blobs, pools.words)
            )
        strategy = method_requests(gen, method, self.principals_for(method["name"]))

        @self._settings(examples)
        @given(strategy)
        def campaign(request: Request) -> None:
            self.send(request)

        campaign()

    def run_envelopes(self, examples: int) -> None:
        # Not devices.rotate_token: a rotation sent as a notification would lose the token.
        names = [m["name"] for m in self.target.document["methods"]]
        names.remove("devices.rotate_token")

        @self._settings(examples)
        @given(envelope_requests(names, ["org", "device", "none"]))
        def campaign(request: Request) -> None:
            self.send(request)

        campaign()

    def run(
        self,
        examples: int,
        envelope_examples: int,
        only: Callable[[str], bool] = lambda name: True,
        progress: Callable[[str, float], None] | None = None,
    ) -> Report:
        started = time.perf_counter()
        # Hypothesis keeps caches under .hypothesis/ in the working directory even without an
        # example database: a scratch directory keeps the repository clean.
        scratch = tempfile.TemporaryDirectory(prefix="fedrpc-fuzz-")
        set_hypothesis_home_dir(scratch.name)
        try:
            for method in self.target.document["methods"]:
                if only(method["name"]):
                    began = time.perf_counter()
                    self.run_method(method, examples)
                    if progress:
                        progress(method["name"], time.perf_counter() - began)
            if envelope_examples:
                self.run_envelopes(envelope_examples)
                self._over_the_cap()
        finally:
            set_hypothesis_home_dir(None)
            scratch.cleanup()
            self.poster.close()
            self.report.seconds = time.perf_counter() - started
        return self.report

    def _over_the_cap(self) -> None:
        """A body past the server's cap: 413 with a JSON-RPC error, the connection or not."""
        body = (
            b'{"jsonrpc":"2.0","method":"system.ping","id":1,"params":{"x":"'
            + b"a" * (MAX_BODY_BYTES + 10)
            + b'"}}'
        )
        request = Request("(envelope)", "org", body, "over the body cap")
        poster = Poster(self.target.host, self.target.port)
        try:
            status, ctype, data = poster.post(body, self.target.tokens["org"])
        except (http.client.HTTPException, OSError):
            return  # the server may close the connection before the client has sent it all
        finally:
            poster.close()
        problems, _ = check_answer(request, status, ctype, data, self.result_types)
        if status != 413:
            problems.append(("an over-cap body not refused with 413", str(status)))
        for kind, detail in problems:
            self.report.add(request, kind, detail)


# --- the world the campaign runs in ----------------------------------------------------------------


def campaign_settings(settings_: Any) -> Any:
    """The campaign's server: no rate limit in the way, a small body cap, no background work."""
    return msgspec.structs.replace(
        settings_,
        rate_limit_per_second=1e9,
        rate_limit_burst=10**9,
        max_body_bytes=MAX_BODY_BYTES,
        background_interval_seconds=3600.0,
    )


async def build_target(client: RpcClient, bundle: dict[str, bytes]) -> Target:
    """The world of test_no_leaks (plus an analytics question) on ``client``'s server."""
    db = client.app[SERVICES].db
    orgs = []
    for name in ("acme", "globex"):
        org, token = await create_org(db, name)
        orgs.append(OrgHandle(org.id, token))
    a, b = orgs
    model = await client.ok("models.create", {"name": "mlp"}, a.token)
    await client.ok("models.versions.create", {"model_id": model["id"], **inline(bundle)}, a.token)
    world = await build_world(client, a, b, model, bundle)
    asked = await client.ok(
        "federations.analytics.descriptive",
        {"federation_id": world.fed["id"], "variable": "walk"},
        a.token,
    )
    document = await client.ok("rpc.discover")
    sides = (world.a, world.b)
    devices = [d for s in sides for d in (*s.devices, s.spare)]
    ids = {
        "org": [a.id, b.id],
        "dev": [d["device_id"] for d in devices],
        "grp": [s.group_id for s in sides],
        "key": [s.key["id"] for s in sides],
        "mdl": [model["id"], world.b.model_id],
        "fed": [world.fed["id"]],
        "rnd": [world.group_round["id"], world.mixed_round["id"]],
        "job": [j for s in sides for j in s.jobs.values()],
        "upl": [u for s in sides for u in s.uploads.values()],
        "anq": [asked["query_id"]],
    }
    blobs = [update_bytes(1), bundle["weights"], bundle["onnx"], bundle["program"], b""]
    words = ["walk", "walk_a", "walk_b", "loss", "accuracy", "fc1.weight", "fc2.bias", "1.0.0"]
    words += [world.a.metric, world.b.metric]
    server = client.http.server
    device = world.a.devices[0]
    return Target(
        host=server.host,
        port=server.port,
        tokens={"org": a.token, "device": device["token"]},
        device_id=device["device_id"],
        document=document,
        pools=Pools(ids, blobs, words),
    )


async def server_still_answers(client: RpcClient, target: Target) -> list[str]:
    """What the server no longer does after the campaign (empty: it is fine)."""
    failed = []
    for principal in ("org", "device"):
        body = await client.call("system.ping", {}, target.tokens[principal])
        if body.get("result", {}).get("pong") is not True:
            failed.append(f"system.ping as {principal}: {body}")
    ready = await client.http.get("/readyz")
    if ready.status != 200:
        failed.append(f"/readyz answered {ready.status}")
    return failed


# --- the bounded campaign of make test ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_artifacts() -> dict[str, bytes]:
    """The MLP's weights, ONNX graph and program (tests/methods' mlp_bundle, out of its reach)."""
    return _bundle("mlp", 1)[1]


async def test_generated_requests_never_break_the_server(aiohttp_client, settings, mlp_artifacts):
    client = RpcClient(await aiohttp_client(create_app(campaign_settings(settings))))
    target = await build_target(client, mlp_artifacts)
    campaign = Campaign(target)
    report = await asyncio.to_thread(campaign.run, EXAMPLES_PER_METHOD, ENVELOPE_EXAMPLES)
    methods = {m["name"] for m in target.document["methods"]}
    assert methods == set(report.outcomes) - {"(envelope)"}, "some method was never called"
    assert report.calls >= len(methods) * EXAMPLES_PER_METHOD
    down = await server_still_answers(client, target)
    failures = report.failures()
    assert not failures and not down, "\n".join(
        [f"{len(failures)} kinds of violation in {report.calls} calls:", *failures, *down]
    )
