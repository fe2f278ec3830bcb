"""The method table: dotted name -> handler, params/result Structs, who may call.

A handler's dotted name is its path: ``methods/training/secagg.py::unmask`` is
``training.secagg.unmask`` (a trailing underscore, as in ``list_``, is dropped).
Its Structs are read from the handler's annotations, so the name, the types
and the code cannot drift apart.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fedrpc.auth import Caller
from fedrpc.errors import AppError
from schemas._base import MutatingParams, Params

Handler = Callable[[Any, Any], Awaitable[Any]]
ORG, DEVICE, PUBLIC, ENROLL = Caller.ORG, Caller.DEVICE, Caller.PUBLIC, Caller.ENROLL
ORG_OR_DEVICE = Caller.ORG | Caller.DEVICE
# Principal.kind -> its flag. An enrollment key ("enroll") passes only where a method names
# ENROLL (devices.register): ORG alone refuses it, so every org method refuses it in dispatch.
_KINDS = {"org": Caller.ORG, "device": Caller.DEVICE, "enroll": Caller.ENROLL}


@dataclass(frozen=True, slots=True)
class MethodSpec:
    name: str
    handler: Handler
    params_type: type[Params]
    result_type: Any
    allow: Caller
    errors: tuple[type[AppError], ...]
    decoder: msgspec.json.Decoder
    # Derived from allow and params_type, as plain values: read on every call, and
    # a Flag's ``in`` runs Python code.
    public: bool = field(init=False)
    idempotent: bool = field(init=False)
    kinds: frozenset[str] = field(init=False)  # principal kinds allowed: "org", "device", "enroll"

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: fields derived once, here
        set_(self, "public", Caller.PUBLIC in self.allow)
        set_(self, "idempotent", issubclass(self.params_type, MutatingParams))
        kinds = {kind for kind, flag in _KINDS.items() if flag in self.allow}
        set_(self, "kinds", frozenset(kinds))

    @property
    def summary(self) -> str:
        # The first docstring line of the Params Struct is the method's summary.
        doc = inspect.getdoc(self.params_type) or inspect.getdoc(self.handler) or ""
        return doc.splitlines()[0] if doc else ""

    @property
    def description(self) -> str:
        return inspect.getdoc(self.handler) or ""


def rpc_method(
    allow: Caller, *, errors: Iterable[type[AppError]] = ()
) -> Callable[[Handler], Handler]:
    """Mark an async handler ``(ctx, params) -> result`` as an RPC method."""

    def mark(fn: Handler) -> Handler:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"{fn.__qualname__} must be async")
        fn.__rpc__ = (allow, tuple(errors))  # type: ignore[attr-defined]
        return fn

    return mark


def spec_for(name: str, fn: Handler) -> MethodSpec:
    allow, errors = fn.__rpc__  # type: ignore[attr-defined]
    hints = typing.get_type_hints(fn)
    args = [p for p in inspect.signature(fn).parameters if p != "ctx"]
    if len(args) != 1:
        raise TypeError(f"{name}: a handler takes (ctx, params)")
    params_type = hints[args[0]]
    if not (isinstance(params_type, type) and issubclass(params_type, Params)):
        raise TypeError(f"{name}: params must be a schemas._base.Params subclass")
    return MethodSpec(
        name, fn, params_type, hints["return"], allow, errors, msgspec.json.Decoder(params_type)
    )


class Registry:
    def __init__(self, specs: Iterable[MethodSpec] = ()) -> None:
        self.methods: dict[str, MethodSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: MethodSpec) -> None:
        if spec.name in self.methods:
            raise ValueError(f"method {spec.name} registered twice")
        self.methods[spec.name] = spec

    def get(self, name: str) -> MethodSpec | None:
        return self.methods.get(name)

    def __iter__(self):
        return iter(sorted(self.methods.values(), key=lambda s: s.name))

    @classmethod
    def from_package(cls, package: str = "methods") -> Registry:
        """Import every module under ``package`` and register its marked handlers."""
        registry = cls()
        root = importlib.import_module(package)
        modules = [root] + [
            importlib.import_module(info.name)
            for info in pkgutil.walk_packages(root.__path__, prefix=package + ".")
        ]
        for module in modules:
            namespace = module.__name__.removeprefix(package).lstrip(".")
            for attr, fn in vars(module).items():
                if callable(fn) and hasattr(fn, "__rpc__") and fn.__module__ == module.__name__:
                    name = f"{namespace}.{attr.rstrip('_')}" if namespace else attr.rstrip("_")
                    registry.add(spec_for(name, fn))
        return registry
