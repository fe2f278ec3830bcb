"""The OpenRPC 1.3.2 document, generated from the registry and the Structs."""

from __future__ import annotations

from typing import Any

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

REF = "#/components/schemas/{name}"


def _errors(spec) -> list[dict[str, Any]]:
    kinds = {Forbidden, NotFound, *spec.errors}
    if spec.idempotent:
        kinds.add(Conflict)
    listed = [{"code": INVALID_PARAMS, "message": PROTOCOL_MESSAGES[INVALID_PARAMS]}]
    listed += [{"code": e.code, "message": e.type} for e in APP_ERRORS if e in kinds]
    return listed


def build_document(registry: Registry, server_url: str = "/rpc") -> dict[str, Any]:
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
        "servers": [{"name": "fedrpc", "url": server_url}],
        "methods": methods,
        "components": {"schemas": components},
    }
