"""POST /rpc: JSON-RPC 2.0 envelope, batches, auth, limits and dispatch.

jsonrpcserver makes the method call (its async ``call``: arguments, context,
result type). Around it this module does what jsonrpcserver gets wrong or
slow: a msgspec envelope check per batch member (its jsonschema check is 75%
of a call and answers a batch with one bad member with a single error), the
method lookup in our registry (its ``dispatch_request`` would also rebuild
and bind the target's signature with ``inspect`` on every call, though the
target has one fixed shape), msgspec params decoding with the failing field
path, and errors that never carry exception text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import re
import time
import warnings
from typing import Any

import msgspec
from aiohttp import HttpVersion11, web

from fedrpc import idempotency
from fedrpc.auth import Network, Principal, client_address, client_key, enroll_bucket
from fedrpc.call_log import log_call
from fedrpc.context import Context, Services
from fedrpc.errors import (
    APP_ERRORS,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    AppError,
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    app_error_object,
    protocol_error_object,
)
from fedrpc.fl import InvalidInput
from fedrpc.registry import MethodSpec
from fedrpc.settings import Settings

with warnings.catch_warnings():
    # jsonrpcserver 5.0.9 reads its schema with a deprecated importlib.resources call.
    warnings.simplefilter("ignore", DeprecationWarning)
    from jsonrpcserver.async_dispatcher import call as jsonrpc_call
    from jsonrpcserver.request import Request as JsonRpcRequest
    from jsonrpcserver.result import Error, Right, SuccessResult

log = logging.getLogger("fedrpc.rpc")
UNSET = msgspec.UNSET


class Envelope(msgspec.Struct):
    """A request object before validation: every member is checked by hand."""

    jsonrpc: Any = UNSET
    method: Any = UNSET
    params: msgspec.Raw = UNSET
    id: Any = UNSET


_body_decoder = msgspec.json.Decoder(Envelope | list[msgspec.Raw])
_member_decoder = msgspec.json.Decoder(Envelope)
_encode = msgspec.json.Encoder().encode
_PATH = re.compile(r" - at (?:`key` in )?`(\$[^`]*)`$")
_JSON = "application/json"
_random_bits = random.getrandbits


def _first_byte(raw: msgspec.Raw) -> bytes:
    return bytes(memoryview(raw)[:1])


class Call(msgspec.Struct):
    """One request object on its way through dispatch (a Struct: built in C, once per call)."""

    env: Envelope | None
    error: dict | None = None
    spec: MethodSpec | None = None
    positional: bool = False  # params given as an array

    @property
    def malformed(self) -> bool:
        return self.error is not None and self.error["code"] == INVALID_REQUEST


_ID_TYPES = (str, int, float, type(None))
BATCH_MEMBER_NOT_OBJECT = "a batch member must be an object"


def _check(env: Envelope, methods: dict[str, MethodSpec], request_id: str) -> Call:
    call = Call(env)
    bad_id = env.id is not UNSET and (isinstance(env.id, bool) or not isinstance(env.id, _ID_TYPES))
    if bad_id:
        env.id = None
    first = _first_byte(env.params) if env.params is not UNSET else b"{"
    if env.jsonrpc != "2.0" or not isinstance(env.method, str) or bad_id:
        call.error = protocol_error_object(
            INVALID_REQUEST, request_id, "not a JSON-RPC 2.0 request object"
        )
    elif first not in (b"{", b"["):
        call.error = protocol_error_object(
            INVALID_REQUEST, request_id, "params must be an object or an array"
        )
    else:
        call.positional = first == b"["
        call.spec = methods.get(env.method)
        if call.spec is None:
            call.error = protocol_error_object(
                METHOD_NOT_FOUND, request_id, f"no method named {env.method[:100]!r}"
            )
    return call


def _parse(body: bytes, services: Services, request_id: str) -> tuple[list[Call], bool] | dict:
    """The calls in a body and whether it was a batch, or a single error object."""
    try:
        decoded = _body_decoder.decode(body)
    except msgspec.ValidationError as exc:
        return protocol_error_object(
            INVALID_REQUEST, request_id, _unreadable(exc, "the body must be a JSON object or array")
        )
    except msgspec.DecodeError:
        return protocol_error_object(PARSE_ERROR, request_id, "the body is not valid JSON")
    except RecursionError:
        return protocol_error_object(
            PARSE_ERROR, request_id, "the body nests arrays or objects too deeply"
        )
    methods = services.registry.methods
    if isinstance(decoded, Envelope):
        return [_check(decoded, methods, request_id)], False
    if not decoded:
        return protocol_error_object(INVALID_REQUEST, request_id, "an empty batch is not a request")
    if len(decoded) > services.settings.max_batch:
        return AppErrorBox(
            BadRequest(f"a batch may hold at most {services.settings.max_batch} calls")
        )
    calls = []
    for raw in decoded:
        try:
            calls.append(_check(_member_decoder.decode(raw), methods, request_id))
        except msgspec.ValidationError as exc:
            calls.append(
                Call(
                    None,
                    protocol_error_object(
                        INVALID_REQUEST, request_id, _unreadable(exc, BATCH_MEMBER_NOT_OBJECT)
                    ),
                )
            )
        except (msgspec.DecodeError, RecursionError):
            calls.append(
                Call(
                    None,
                    protocol_error_object(INVALID_REQUEST, request_id, BATCH_MEMBER_NOT_OBJECT),
                )
            )
    return calls, True


def _unreadable(exc: msgspec.ValidationError, otherwise: str) -> str:
    """Our words for a request msgspec cannot hold: the member at fault when there is one (an
    id beyond 64 bits: the only value of a request object that can fail to decode), else
    ``otherwise`` (the whole is not an object)."""
    where = _PATH.search(str(exc))
    if where is None or where.group(1) == "$":
        return otherwise
    return f"{where.group(1)[2:]} is not a usable value (a number beyond 64 bits?)"


class AppErrorBox(dict):
    """Marks a whole-request error that is an application error, not a protocol one."""

    def __init__(self, exc: AppError) -> None:
        super().__init__()
        self.exc = exc


def decode_params(spec: MethodSpec, raw: msgspec.Raw | Any, positional: bool) -> Any:
    if raw is UNSET:
        return spec.decoder.decode(b"{}")
    if positional:
        values = msgspec.json.decode(raw)
        names = [f.encode_name for f in msgspec.structs.fields(spec.params_type)]
        if len(values) > len(names):
            raise msgspec.ValidationError(f"expected at most {len(names)} positional params")
        return spec.decoder.decode(_encode(dict(zip(names, values, strict=False))))
    return spec.decoder.decode(raw)


async def _run_once(ctx: Context, spec: MethodSpec, params: Any) -> bytes:
    """An idempotent call: the stored answer of an earlier call with this key, or a new one."""

    async def run() -> bytes:
        return _encode(await spec.handler(ctx, params))

    digest = hashlib.sha256(_encode(params)).digest()
    return await idempotency.run_once(
        ctx.db, ctx.principal, spec.name, params.idempotency_key, digest, run
    )


async def _jsonrpc_target(ctx: Context, call: Call) -> Any:
    """What jsonrpcserver calls: never raises, always returns a jsonrpcserver Result."""
    spec, request_id = call.spec, ctx.request_id
    assert spec is not None
    try:
        if not spec.public and ctx.principal.kind not in spec.kinds:
            raise Forbidden(_REFUSED[ctx.principal.kind].format(spec.name))
        try:
            params = decode_params(spec, call.env.params, call.positional)
        except msgspec.ValidationError as exc:
            text = str(exc)
            match = _PATH.search(text)
            return Error(
                **protocol_error_object(
                    INVALID_PARAMS,
                    request_id,
                    _PATH.sub("", text),
                    path=match.group(1) if match else "$",
                )
            )
        except (msgspec.DecodeError, RecursionError):
            return Error(
                **protocol_error_object(
                    INVALID_PARAMS, request_id, "params are not valid JSON or nest too deeply"
                )
            )
        if spec.idempotent and params.idempotency_key is not None:
            return Right(SuccessResult(msgspec.Raw(await _run_once(ctx, spec, params))))
        # What jsonrpcserver's Success() builds, without its extra call.
        return Right(SuccessResult(msgspec.Raw(_encode(await spec.handler(ctx, params)))))
    except AppError as exc:
        return Error(**app_error_object(exc, request_id))
    except InvalidInput as exc:
        return Error(**app_error_object(BadRequest(str(exc)), request_id))
    except Exception:
        log.exception("unhandled error in %s (request %s)", spec.name, request_id)
        return Error(
            **protocol_error_object(
                INTERNAL_ERROR, request_id, "the server failed to complete the call"
            )
        )


async def _dispatch(
    services: Services,
    principal: Principal | None,
    who: str,
    call: Call,
    request_id: str,
    transport: asyncio.BaseTransport | None = None,
) -> tuple[bytes | None, dict | None]:
    """The call's encoded answer (None for a notification) and its error object, if any."""
    started = time.perf_counter()
    env, spec, error = call.env, call.spec, call.error
    id_ = None if env is None or env.id is UNSET else env.id
    if error is None:
        name = spec.name
        ctx = Context(services, principal, request_id, transport)
        result = await jsonrpc_call(JsonRpcRequest(name, [call], id_), ctx, _jsonrpc_target)
        outcome = getattr(result, "_value", None)  # oslash: Right holds _value, Left holds _error
        if isinstance(outcome, SuccessResult):
            body = (
                b'{"jsonrpc":"2.0","result":'
                + bytes(outcome.result)
                + b',"id":'
                + _encode(id_)
                + b"}"
            )
        else:
            err = result._error
            error = {"code": err.code, "message": err.message, "data": err.data}
    else:
        name = spec.name if spec else "unknown"
    if error is not None:
        body = _encode({"jsonrpc": "2.0", "error": error, "id": id_})
    duration = time.perf_counter() - started
    if error is None:
        services.metrics.observe(name, "ok", duration)
        log_call(name, who, duration, request_id, "ok", None)
    else:
        services.metrics.observe(name, error["data"]["type"], duration)
        log_call(name, who, duration, request_id, error["data"]["type"], error["code"])
    if env is not None and env.id is UNSET and not call.malformed:
        return None, error  # a notification: a well-formed request without an id, even a failed one
    return body, error


# The HTTP status of a single call's error raised by a handler (a batch is always 200: its
# members' outcomes differ). Only these differ from 200 (docs/design.md, the errors table).
_HTTP_STATUS = {e.type: e.http_status for e in APP_ERRORS if e.http_status != 200}


def _single_answer_headers(error: dict | None, headers: dict[str, str]) -> tuple[int, dict]:
    if error is None or (status := _HTTP_STATUS.get(error["data"]["type"])) is None:
        return 200, headers
    retry_after = error["data"].get("retry_after")
    if retry_after is not None:
        headers = {**headers, "Retry-After": str(retry_after)}
    return status, headers


_REFUSED = {
    "org": "an organization's API key may not call {}",
    "device": "a device may not call {}",
    "enroll": "an enrollment key may only register devices, not call {}",
}


def _error_response(
    status: int, error: dict, headers: dict[str, str] | None = None
) -> web.Response:
    body = _encode({"jsonrpc": "2.0", "error": error, "id": None})
    return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


class RpcEndpoint:
    """``POST /rpc``. The app's start-up gives it the services (they are made on the loop).

    The bearer token is checked before the body is read: a known token (the auth cache)
    costs a dict lookup; an unknown one is refused from memory or after one lookup that
    the client's address must have budget for; without a token the body may hold
    ``unauthenticated_max_body_bytes`` at most (the public methods take no params). A
    refusal that leaves a large body unsent closes the connection instead of reading it,
    and ``Expect: 100-continue`` is answered only once the caller may send its body.
    """

    def __init__(self) -> None:
        self.services: Services | None = None
        self.proxies: tuple[Network, ...] = ()  # FEDRPC_TRUSTED_PROXIES

    async def expect(self, request: web.Request) -> None:
        """The route's Expect handler: ``100 Continue`` is deferred to ``handle`` (after the
        token and the declared length were checked), so that a client that waits for it
        never sends a body that would be refused. Other expectations fail as aiohttp has
        them fail (417)."""
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="only 'Expect: 100-continue' is understood")

    def client(self, request: web.Request) -> str | None:
        """The caller's address (the TCP peer unless it is a trusted proxy)."""
        if not self.proxies:
            return request.remote
        return client_address(
            request.remote, request.headers.getall("X-Forwarded-For", []), self.proxies
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        services = self.services
        assert services is not None, "the app has not started"
        settings = services.settings
        # A correlation id, not a secret: drawn from `random` (seeded from the OS at start-up
        # and after a fork), because os.urandom costs a system call per request.
        request_id = f"{_random_bits(64):016x}"
        headers = {"X-Request-Id": request_id}
        header = request.headers.get("Authorization")
        principal = services.auth.cached(header)  # the common case, without a coroutine
        client = None
        if principal is None:
            client = self.client(request)
            if header is not None:
                try:
                    principal = await services.auth.authenticate(header, client_key(client))
                except Unauthorized as exc:
                    refusal = _unauthorized(services, exc, request_id)
                    return await _refuse(request, settings, refusal)
                except RateLimited as exc:
                    refusal = _rate_limited(services, exc, request_id, headers)
                    return await _refuse(request, settings, refusal)
        if principal is None:  # no token: public calls only, and they are small
            anonymous = f"ip:{client_key(client)}"
            wait = services.limiter.take(anonymous)
            if wait > 0:
                limited = _rate_limited(services, _too_many(wait), request_id, headers)
                return await _refuse(request, settings, limited)
            limit = min(settings.unauthenticated_max_body_bytes, settings.max_body_bytes)
            body = await _read_at_most(request, limit) if await _go_on(request, limit) else None
            if body is None:
                exc = PayloadTooLarge(
                    f"a request without a token may send at most {limit} bytes"
                    " (the methods callable without one take no params)"
                )
                return await _refuse(request, settings, _too_large(exc, request_id, headers))
        else:
            # The first call is paid for before the body is read: a principal over its rate
            # cannot make the server read (up to) max_body_bytes per refused request.
            wait = services.limiter.take(principal.label)
            if wait > 0:
                limited = _rate_limited(services, _too_many(wait), request_id, headers)
                return await _refuse(request, settings, limited)
            body = None
            if await _go_on(request, settings.max_body_bytes):
                with contextlib.suppress(web.HTTPRequestEntityTooLarge):  # past client_max_size
                    body = await request.read()
            if body is None:
                exc = PayloadTooLarge(f"the request body exceeds {settings.max_body_bytes} bytes")
                return await _refuse(request, settings, _too_large(exc, request_id, headers))
        parsed = _parse(body, services, request_id)
        if isinstance(parsed, AppErrorBox):
            return _error_response(200, app_error_object(parsed.exc, request_id), headers)
        if isinstance(parsed, dict):
            return _error_response(200, parsed, headers)
        calls, is_batch = parsed
        if principal is None:
            if any(c.spec and not c.spec.public for c in calls):
                exc = Unauthorized("this method needs 'Authorization: Bearer <token>'")
                return _unauthorized(services, exc, request_id)
            # The first call was paid for before the body was read.
            wait = services.limiter.take(anonymous, len(calls) - 1) if len(calls) > 1 else 0.0
            if wait > 0:
                return _rate_limited(services, _too_many(wait), request_id, headers)
            who, label = anonymous, "anonymous"
        else:
            # Enrollment keys are never cached, so this check stays off the hot path.
            if principal.kind == "enroll":
                enrolls = sum(1 for c in calls if c.spec and "enroll" in c.spec.kinds)
                if client is None:
                    client = self.client(request)
                bucket = enroll_bucket(principal, client_key(client))
                wait = services.auth.enroll_limiter.take(bucket, enrolls) if enrolls else 0.0
                if wait > 0:
                    return _rate_limited(services, _too_many(wait), request_id, headers)
            who = label = principal.label
            wait = services.limiter.take(who, len(calls) - 1) if len(calls) > 1 else 0.0
            if wait > 0:
                return _rate_limited(services, _too_many(wait), request_id, headers)
        transport = request.transport  # rpc.discover reads its local address, if called
        if not is_batch:
            payload, error = await _dispatch(
                services, principal, label, calls[0], request_id, transport
            )
            if payload is None:
                return web.Response(status=204, headers=headers)
            status, headers = _single_answer_headers(error, headers)
            return web.Response(body=payload, status=status, content_type=_JSON, headers=headers)
        bodies = [
            (await _dispatch(services, principal, label, c, request_id, transport))[0]
            for c in calls
        ]
        answers = [b for b in bodies if b is not None]
        if not answers:
            return web.Response(status=204, headers=headers)
        return web.Response(
            body=b"[" + b",".join(answers) + b"]", content_type=_JSON, headers=headers
        )


async def _go_on(request: web.Request, limit: int) -> bool:
    """Whether a body of the declared length may come (False: over ``limit``); when it may
    and the client waits for ``100 Continue`` (see ``RpcEndpoint.expect``), say it."""
    length = request.content_length
    if length is not None and length > limit:
        return False
    if request.version == HttpVersion11 and "Expect" in request.headers:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own handler: the body has not begun
    return True


async def _read_at_most(request: web.Request, limit: int) -> bytes | None:
    """The body, or None when it is longer than ``limit`` (then as little of it is read
    as can be: nothing when its length is declared)."""
    if request.content_length is not None:
        return await request.read()  # _go_on checked the length
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


CLOSE_GRACE_SECONDS = 0.5
"""How long a connection refused before its body was read stays open after the answer."""


async def _refuse(
    request: web.Request, settings: Settings, response: web.Response
) -> web.StreamResponse:
    """Answer without reading the request body.

    What is left of a small body (at most ``unauthenticated_max_body_bytes``, or already
    received) is drained as usual and the connection kept. A larger one is never read:
    the answer is sent with ``Connection: close`` and the end of our side of the stream,
    then the connection is dropped after ``CLOSE_GRACE_SECONDS`` (time for the client to
    read the answer before the reset the unread bytes cause). So is a body announced with
    ``Expect: 100-continue``: its client may never send it, and whatever comes next on the
    connection must not be taken for it.
    """
    length = request.content_length
    small = length is not None and length <= settings.unauthenticated_max_body_bytes
    if request.content.is_eof() or (small and "Expect" not in request.headers):
        return response
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    transport = request.transport
    if transport is not None and transport.can_write_eof():
        transport.write_eof()
    await asyncio.sleep(CLOSE_GRACE_SECONDS)
    request.protocol.force_close()
    return response


def _unauthorized(services: Services, exc: Unauthorized, request_id: str) -> web.Response:
    services.metrics.error("unauthorized")
    headers = {"X-Request-Id": request_id, "WWW-Authenticate": "Bearer"}
    return _error_response(401, app_error_object(exc, request_id), headers)


def _too_large(exc: PayloadTooLarge, request_id: str, headers: dict[str, str]) -> web.Response:
    return _error_response(413, app_error_object(exc, request_id), headers)


def _too_many(wait: float) -> RateLimited:
    return RateLimited("too many calls; retry later", retry_after=math.ceil(wait))


def _rate_limited(
    services: Services, exc: RateLimited, request_id: str, headers: dict[str, str]
) -> web.Response:
    services.metrics.error("rate_limited")
    headers = {**headers, "Retry-After": str(exc.details["retry_after"])}
    return _error_response(429, app_error_object(exc, request_id), headers)
