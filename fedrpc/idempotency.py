"""Replays of mutating calls: the first result is stored and returned again.

The key is claimed before the handler runs, so two concurrent calls with one
key cannot both run it; a failed call releases its claim so it can be retried.
A claim left behind by a crashed process expires after ten minutes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from fedrpc.db import Database
from fedrpc.errors import Conflict


class StoredCall(msgspec.Struct):
    params_hash: bytes
    result: bytes | None


async def run_once(
    db: Database,
    scope: str,
    method: str,
    key: str,
    params_hash: bytes,
    call: Callable[[], Awaitable[bytes]],
) -> bytes:
    ids = {"scope": scope, "method": method, "key": key}
    claimed = await db.value("idempotency.claim_key", params_hash=params_hash, **ids)
    if not claimed:
        stored = await db.maybe("idempotency.find_key", StoredCall, **ids)
        if stored is None:
            raise Conflict("a call with this idempotency_key is in progress; retry shortly")
        if stored.params_hash != params_hash:
            raise Conflict("this idempotency_key was already used with different params")
        if stored.result is None:
            raise Conflict("a call with this idempotency_key is in progress; retry shortly")
        return stored.result
    try:
        result = await call()
    except BaseException:
        await db.run("idempotency.release_key", **ids)
        raise
    await db.run("idempotency.complete_key", result=result, **ids)
    return result
