"""Group commit: the calls of one statement made in the same event-loop turn run as one.

Behind :meth:`fedrpc.db.Database.coalesced`. Most of a small statement's
server CPU is fixed cost (the pool checkout, psycopg's send and wait: about
half of a ``devices.sync`` under the rpc_overhead bench, seen with py-spy),
so one heartbeat statement for every device that synced in the same turn
costs little more than one for a single device.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec
import psycopg

if TYPE_CHECKING:
    from fedrpc.db import Database

__all__ = ["GroupCommit", "encode_calls"]


class GroupCommit:
    """The pending and running batches of one statement behind ``Database.coalesced``.

    A call waits only for the end of the current event-loop turn (``call_soon``), so a lone
    call gains no latency. At most ``max_in_flight`` batches run at once; calls arriving
    meanwhile form the next batch, which therefore grows with the load (7 to 15 calls per
    statement under the rpc_overhead bench's 16 connections). Two batches in flight may touch
    the same rows: their keys are sorted so that they lock in one order, and a deadlock that
    still happens is one more failure after which every call is retried alone.
    """

    def __init__(
        self,
        db: Database,
        query: str,
        type_: type,
        key: str,
        *,
        max_batch: int = 256,
        max_in_flight: int = 2,
    ) -> None:
        self.db, self.query, self.type, self.key = db, query, type_, key
        self.max_batch, self.max_in_flight = max_batch, max_in_flight
        self._pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, params: dict[str, Any]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((params, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start)
        return await future

    def _start(self) -> None:
        self._scheduled = False
        while self._pending and self._in_flight < self.max_in_flight:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        try:
            await self._settle(batch)
        except BaseException as exc:
            # Never leave a caller waiting: whatever stopped the batch reaches every caller.
            for _, future in batch:
                if isinstance(exc, Exception):
                    _settle_future(future, exc=exc)
                elif not future.done():
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
        finally:
            self._in_flight -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._start)

    async def _settle(self, batch: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        key = self.key
        merged: dict[Any, dict[str, Any]] = {}
        for params, _ in batch:
            earlier = merged.get(params[key])
            merged[params[key]] = (
                params
                if earlier is None
                else {n: earlier[n] if v is None else v for n, v in params.items()}
            )
        # Sorted keys lock rows in one order, whichever process's batch gets there first.
        keys = sorted(merged)
        try:
            rows = await self.db.all(
                self.query, self.type, calls=encode_calls([merged[k] for k in keys]), keys=keys
            )
        except psycopg.OperationalError as exc:  # the pool or the connection: no call can succeed
            for _, future in batch:
                _settle_future(future, exc=exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                _settle_future(batch[0][1], exc=exc)
                return
            # One call's values (a CHECK they break, or a deadlock with another writer) failed the
            # batch: run each call alone, in arrival order, so that each gets its own answer or its
            # own error. (A NUL character never gets here: `Database.coalesced` refuses it first.)
            for params, future in batch:
                try:
                    row = await self.db._alone(self.query, self.type, key, params)
                except Exception as alone_exc:  # handed to the caller it belongs to
                    _settle_future(future, exc=alone_exc)
                else:
                    _settle_future(future, row)
            return
        by_key = {getattr(row, key): row for row in rows}
        for params, future in batch:
            _settle_future(future, by_key.get(params[key]))


def encode_calls(calls: list[dict[str, Any]]) -> str:
    return msgspec.json.encode(calls).decode()


def _settle_future(
    future: asyncio.Future, result: Any = None, *, exc: BaseException | None = None
) -> None:
    if future.done():  # its caller was cancelled and no longer waits
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)
