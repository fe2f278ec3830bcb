"""The fedrpc SDK for scripts and admin tools: ``Client`` (async) and ``SyncClient``.

``client.training.create_round(model_id=..., ...)`` calls ``training.create_round``:
attribute access builds the dotted method name, so a server method needs no
SDK change. Where this package's registry knows the method, its params are
the method's, its result is decoded into the method's Result Struct, and a
mutating call gets an idempotency key (kept across retries, so a retry never
doubles a side effect). Errors raise the server's own exception types by
``data.type`` (``fedrpc.errors``: ``NotFound``, ``Forbidden``,
``PrivacyBudgetExhausted``...). Retries with exponential backoff and jitter
on HTTP 429 and 503 and on connection errors, honouring ``Retry-After``.

A few calls are more than one server method (``_HELPERS``):
``client.models.versions.create_from_module(model_id=..., module=...,
example_input=...)`` builds the three artifacts of a base version from a torch
module and sends each inline or through a presigned upload by its size
(:meth:`Client.payload`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import msgspec

from fedrpc import errors

__all__ = ["Client", "SyncClient", "error_from"]

_BY_TYPE = {cls.type: cls for cls in errors.APP_ERRORS}
# 429 and 503 are the server's own; 502 and 504 come from a proxy in front of it.
_RETRY_STATUS = {429, 502, 503, 504}
#: Payloads up to this size go inline (base64 in the JSON body); larger ones through
#: uploads.create and a presigned PUT, which the server's body limit does not bound.
INLINE_MAX_BYTES = 8 * 1024 * 1024


class _Envelope(msgspec.Struct):
    id: Any = None
    result: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error: dict[str, Any] | None = None


def error_from(error: dict[str, Any]) -> errors.AppError:
    """The exception of a JSON-RPC error object, by its ``data.type``."""
    data = dict(error.get("data") or {})
    kind, message = data.pop("type", "internal_error"), data.pop("message", error.get("message"))
    exc = _BY_TYPE.get(kind, errors.AppError)(str(message), **data)
    exc.code = error.get("code")
    return exc


@functools.cache
def _specs() -> dict[str, Any]:
    # The server's own method table: names, params and Result Structs (imported once).
    from fedrpc.registry import Registry

    return {spec.name: spec for spec in Registry.from_package()}


class _Dotted:
    """``ns.name`` is the namespace (or method) ``prefix.name``; a helper of ``_HELPERS`` when
    it has that name."""

    def __init__(self, client: Any, prefix: str) -> None:
        self._client, self._prefix = client, prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        dotted = f"{self._prefix}.{name}"
        if dotted in _HELPERS:
            return self._helper(_HELPERS[dotted])
        return type(self)(self._client, dotted)

    def _helper(self, helper: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        raise NotImplementedError


class _Namespace(_Dotted):
    def _helper(self, helper):
        return functools.partial(helper, self._client)

    async def __call__(self, **params: Any) -> Any:
        return await self._client.call(self._prefix, params)


class Client:
    """An async JSON-RPC client of one fedrpc server.

    Parameters
    ----------
    url
        The server's ``/rpc`` URL.
    token
        An org API key (``fk_...``) or a device token (``fd_...``).
    retries
        Attempts after the first on 429, 503 and connection errors.
    backoff, max_backoff
        First wait and cap, in seconds; each retry doubles the wait, times a
        jitter in [0.5, 1.5), unless the server says ``Retry-After``.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 10.0,
        timeout: float = 120.0,
        inline_max_bytes: int = INLINE_MAX_BYTES,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url, self.token = url, token
        self.inline_max_bytes = inline_max_bytes
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session, self._own = session, session is None
        self._ids = 0
        self._jitter = random.Random()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    def __getattr__(self, name: str) -> _Namespace:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Namespace(self, name)

    def _request(self, method: str, params: dict[str, Any] | None) -> dict[str, Any]:
        params = dict(params or {})
        spec = _specs().get(method)
        if spec is not None and spec.idempotent and "idempotency_key" not in params:
            params["idempotency_key"] = uuid.uuid4().hex  # the same on every retry
        self._ids += 1
        return {"jsonrpc": "2.0", "method": method, "params": params, "id": self._ids}

    async def call(
        self, method: str, params: dict[str, Any] | None = None, *, token: str | None = None
    ) -> Any:
        """One call; its Result Struct (or plain JSON for a method this SDK does not know).

        ``token`` replaces the client's own for this call (a device registering with its
        organization's key)."""
        (envelope,) = await self._post([self._request(method, params)], token)
        return self._outcome(method, envelope, raise_errors=True)

    async def batch(self, calls: Sequence[tuple[str, dict[str, Any] | None]]) -> list[Any]:
        """Several calls in one request; each result, or the exception of a failed call."""
        requests = [self._request(m, p) for m, p in calls]
        by_id = {e.id: e for e in await self._post(requests)}
        return [self._outcome(r["method"], by_id[r["id"]], raise_errors=False) for r in requests]

    def _outcome(self, method: str, envelope: _Envelope, *, raise_errors: bool) -> Any:
        if envelope.error is not None:
            exc = error_from(envelope.error)
            if raise_errors:
                raise exc
            return exc
        spec = _specs().get(method)
        kind = Any if spec is None else spec.result_type
        return msgspec.json.decode(envelope.result, type=kind)

    async def payload(self, purpose: str, data: bytes) -> dict[str, Any]:
        """A ``Payload`` param for ``data``: inline up to ``inline_max_bytes``, else uploaded
        (``uploads.create`` for ``purpose``, then a PUT to its presigned URL) and named by id."""
        if len(data) <= self.inline_max_bytes:
            return {"data": data}
        upload = await self.call(
            "uploads.create",
            {
                "purpose": purpose,
                "size_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            },
        )
        await self.put(upload.url, data, method=upload.method)
        return {"upload_id": upload.upload_id}

    async def put(self, url: str, data: bytes, *, method: str = "PUT") -> None:
        """Send bytes to a presigned URL, retried like a call (the object is the same bytes)."""
        await self._send(method, url, data, {}, lambda status: status < 300)

    async def get(self, url: str, *, max_bytes: int | None = None) -> bytes:
        """The bytes at a presigned URL (a version's artifact); with ``max_bytes``, a body
        longer than that is cut off and refused (``PayloadTooLarge``) without reading it all."""
        return await self._send("GET", url, None, {}, lambda status: status < 300, max_bytes)

    async def _send(
        self, method, url, data, headers, ok: Callable[[int], bool], max_bytes: int | None = None
    ) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        for attempt in range(self.retries + 1):
            try:
                async with self._session.request(method, url, data=data, headers=headers) as resp:
                    raw = await _read(resp, max_bytes)
                    if ok(resp.status):
                        return raw
                    if attempt == self.retries or (
                        resp.status not in _RETRY_STATUS and resp.status < 500
                    ):
                        raise errors.AppError(f"{method} of a presigned URL answered {resp.status}")
            except (TimeoutError, aiohttp.ClientConnectionError):
                if attempt == self.retries:
                    raise
            await asyncio.sleep(self._delay(attempt))
        raise AssertionError("unreachable")

    async def _post(
        self, requests: list[dict[str, Any]], token: str | None = None
    ) -> list[_Envelope]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = msgspec.json.encode(requests if len(requests) > 1 else requests[0])
        headers = {"Content-Type": "application/json"}
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        for attempt in range(self.retries + 1):
            wait = None
            try:
                async with self._session.post(self.url, data=body, headers=headers) as resp:
                    raw = await resp.read()
                    if resp.status not in _RETRY_STATUS or attempt == self.retries:
                        return self._envelopes(raw, len(requests), resp.status)
                    wait = _retry_after(resp.headers.get("Retry-After"))
                    if wait is not None:  # a server or proxy must not park the client
                        wait = min(wait, self.max_backoff)
            except (TimeoutError, aiohttp.ClientConnectionError):
                if attempt == self.retries:
                    raise
            await asyncio.sleep(wait if wait is not None else self._delay(attempt))
        raise AssertionError("unreachable")

    def _delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + self._jitter.random())

    @staticmethod
    def _envelopes(raw: bytes, count: int, status: int) -> list[_Envelope]:
        try:
            if count == 1:
                return [msgspec.json.decode(raw, type=_Envelope)]
            return msgspec.json.decode(raw, type=list[_Envelope])
        except msgspec.DecodeError:  # a proxy's error page, say: not the server's answer
            raise errors.AppError(f"HTTP {status} without a JSON-RPC answer") from None


async def create_from_module(
    client: Client,
    *,
    model_id: str,
    module: Any,
    example_input: Any,
    description: str = "",
) -> Any:
    """Register ``module`` as a new base version of ``model_id``
    (``models.versions.create``): its state dict, ONNX graph and torch.export
    program (:func:`fedrpc.client.artifacts.module_artifacts`), each sent
    inline or through a presigned upload by its size."""
    from fedrpc.client.artifacts import module_artifacts

    files = await asyncio.to_thread(module_artifacts, module, example_input)
    sent = {kind: await client.payload("model_artifact", data) for kind, data in files.items()}
    return await client.call(
        "models.versions.create",
        {"model_id": model_id, "description": description, "weights_encoding": "safetensors"}
        | sent,
    )


#: Calls that are more than one server method, by the dotted name they answer to.
_HELPERS: dict[str, Callable[..., Awaitable[Any]]] = {
    "models.versions.create_from_module": create_from_module,
}


async def _read(resp: aiohttp.ClientResponse, max_bytes: int | None) -> bytes:
    if max_bytes is None:
        return await resp.read()
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise errors.PayloadTooLarge(f"the body is {resp.content_length} bytes, over {max_bytes}")
    parts, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            raise errors.PayloadTooLarge(f"the body is over {max_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class SyncClient:
    """The same client for code without an event loop: each call runs one.

    ``SyncClient(url, token).models.list()``; not for use inside a running loop.
    """

    def __init__(self, url: str, token: str | None = None, **options: Any) -> None:
        self.url, self.token, self.options = url, token, options

    def __getattr__(self, name: str) -> _SyncNamespace:
        if name.startswith("_"):
            raise AttributeError(name)
        return _SyncNamespace(self, name)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return asyncio.run(self._run(lambda c: c.call(method, params)))

    def batch(self, calls: Sequence[tuple[str, dict[str, Any] | None]]) -> list[Any]:
        return asyncio.run(self._run(lambda c: c.batch(calls)))

    async def _run(self, work: Any) -> Any:
        async with Client(self.url, self.token, **self.options) as client:
            return await work(client)


class _SyncNamespace(_Dotted):
    def _helper(self, helper):
        return lambda **kw: asyncio.run(self._client._run(lambda c: helper(c, **kw)))

    def __call__(self, **params: Any) -> Any:
        return self._client.call(self._prefix, params)
