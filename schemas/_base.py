"""Base Structs: strict params, compact results."""

from __future__ import annotations

from typing import Annotated

import msgspec


class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Method params: unknown fields are refused, everything is named."""


IdempotencyKey = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        description="Replays with the same key return the first result.",
    ),
]


class MutatingParams(Params, kw_only=True):
    """Params of a method that changes state; carries the optional idempotency key."""

    idempotency_key: IdempotencyKey | None = None


class Result(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Method results: fields left at their defaults are omitted on the wire."""


class Empty(Params):
    """No params."""
