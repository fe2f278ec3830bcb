"""The OpenRPC 1.3.2 document, generated from the registry and the Structs.

The document is built once per registry; only ``servers[0].url`` depends on the request.
It must be absolute (the reference tooling refuses ``/rpc``): ``FEDRPC_PUBLIC_URL`` when
set, else the address the server listens on (``server_url``). The client's ``Host`` header
is never used: the document tells an SDK where to send its bearer token, so a Host chosen
by a client (or replayed from a shared cache) must not be able to name another server.
The URL is spliced into the one encoded document (``OpenRpcDocument.encoded``), which
``rpc.discover`` and ``GET /openrpc.json`` both return: neither builds nor encodes it again.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import msgspec

from fedrpc import __version__
from fedrpc.errors import (
    APP_ERRORS,
    INVALID_PARAMS,
    PROTOCOL_MESSAGES,
    Conflict,
    Forbidden,
    NotFound,
)
from fedrpc.registry import Registry

if TYPE_CHECKING:
    import asyncio

    from fedrpc.settings import Settings

RPC_PATH = "/rpc"
REF = "#/components/schemas/{name}"


def _errors(spec) -> list[dict[str, Any]]:
    kinds = {Forbidden, NotFound, *spec.errors}
    if spec.idempotent:
        kinds.add(Conflict)
    listed = [{"code": INVALID_PARAMS, "message": PROTOCOL_MESSAGES[INVALID_PARAMS]}]
    listed += [{"code": e.code, "message": e.type} for e in APP_ERRORS if e in kinds]
    return listed


def build_document(registry: Registry, server_url: str) -> dict[str, Any]:
    specs = list(registry)
    types = [t for s in specs for t in (s.params_type, s.result_type)]
    schemas, components = msgspec.json.schema_components(types, ref_template=REF)
    methods = []
    for spec, params_schema, result_schema in zip(specs, schemas[0::2], schemas[1::2], strict=True):
        params_obj = components[params_schema["$ref"].rsplit("/", 1)[1]]
        required = set(params_obj.get("required", []))
        params = [
            {"name": name, "schema": schema, "required": name in required}
            for name, schema in params_obj.get("properties", {}).items()
        ]
        callers = [c.name.lower() for c in type(spec.allow) if c in spec.allow]
        methods.append(
            {
                "name": spec.name,
                "summary": spec.summary,
                "description": spec.description,
                "paramStructure": "either",
                "params": params,
                "result": {"name": "result", "schema": result_schema},
                "errors": _errors(spec),
                "x-callers": callers,
            }
        )
    return {
        "openrpc": "1.3.2",
        "info": {
            "title": "fedrpc",
            "version": __version__,
            "description": "Control plane for federated learning over JSON-RPC 2.0.",
        },
        "servers": [server(server_url)],
        "methods": methods,
        "components": {"schemas": components},
    }


def server(url: str) -> dict[str, str]:
    return {"name": "fedrpc", "url": url}


# Listen addresses that mean "every interface": the URL names the one the call arrived on.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def server_url(settings: Settings, transport: asyncio.BaseTransport | None = None) -> str:
    """The absolute URL of ``POST /rpc`` to publish, never taken from the request's headers.

    ``FEDRPC_PUBLIC_URL`` plus ``/rpc`` when set. Else ``FEDRPC_HOST`` with the port of the
    socket the call arrived on (``transport``; ``FEDRPC_PORT`` without one); a wildcard host
    (``0.0.0.0``, ``::``) is replaced by that socket's own address, or the loopback address
    when there is no socket. Computed only when asked for: ``rpc.discover`` and
    ``GET /openrpc.json``, so the other calls pay nothing for it.
    """
    if settings.public_url:
        return settings.public_url.rstrip("/") + RPC_PATH
    local = transport.get_extra_info("sockname") if transport is not None else None
    secure = transport is not None and transport.get_extra_info("sslcontext") is not None
    host, port = settings.host, settings.port
    if isinstance(local, tuple) and len(local) >= 2:
        port = local[1]
        if host in WILDCARD_HOSTS:
            host = local[0]
    elif host in WILDCARD_HOSTS:
        host = "::1" if host == "::" else "127.0.0.1"
    host = host.split("%", 1)[0]  # an IPv6 zone id is not part of a URL's host
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if secure else 'http'}://{host}:{port}{RPC_PATH}"


class OpenRpcDocument:
    """One registry's document, built once; each answer gets its own server URL."""

    _MARK = "\u0000server-url\u0000"  # cannot occur elsewhere: no schema or summary holds NUL

    def __init__(self, registry: Registry) -> None:
        self.methods = len(registry.methods)
        self.document = build_document(registry, self._MARK)
        head, tail = msgspec.json.encode(self.document).split(msgspec.json.encode(self._MARK))
        self._head, self._tail = head, tail

    def encoded(self, url: str) -> bytes:
        """The JSON document with ``url`` as its server."""
        return self._head + msgspec.json.encode(url) + self._tail


_DOCUMENTS: weakref.WeakKeyDictionary[Registry, OpenRpcDocument] = weakref.WeakKeyDictionary()


def document_for(registry: Registry) -> OpenRpcDocument:
    """The registry's document, rebuilt only when methods were added since."""
    doc = _DOCUMENTS.get(registry)
    if doc is None or doc.methods != len(registry.methods):
        doc = _DOCUMENTS[registry] = OpenRpcDocument(registry)
    return doc
