"""JsonLineHandler: when batched lines reach the stream, and where call lines go."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging

from fedrpc import call_log
from fedrpc.call_log import (
    FLUSH_DELAY_SECONDS,
    JsonFormatter,
    JsonLineHandler,
    log_call,
)


def _handler() -> tuple[JsonLineHandler, io.StringIO]:
    stream = io.StringIO()
    handler = JsonLineHandler(stream)
    handler.setFormatter(JsonFormatter())
    return handler, stream


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _record(msg: str) -> logging.LogRecord:
    return logging.makeLogRecord({"name": "t", "msg": msg, "levelname": "INFO", "levelno": 20})


async def test_lines_on_a_loop_wait_for_one_flush():
    handler, stream = _handler()
    for i in range(3):
        handler.emit(_record(f"m{i}"))
    assert stream.getvalue() == ""
    await asyncio.sleep(FLUSH_DELAY_SECONDS * 3)
    assert [x["msg"] for x in _lines(stream)] == ["m0", "m1", "m2"]


def test_a_line_without_a_loop_is_written_at_once():
    handler, stream = _handler()
    handler.emit(_record("now"))
    assert [x["msg"] for x in _lines(stream)] == ["now"]


async def test_a_full_buffer_is_written_at_once():
    handler, stream = _handler()
    for i in range(call_log._MAX_PENDING_LINES):
        handler.emit(_record(f"m{i}"))
    assert len(_lines(stream)) == call_log._MAX_PENDING_LINES


def test_lines_left_by_a_closed_loop_go_out_with_the_next_line():
    handler, stream = _handler()

    async def log_one(msg: str) -> None:
        handler.emit(_record(msg))

    asyncio.run(log_one("first"))  # arms a flush on a loop that then closes
    assert stream.getvalue() == ""
    loop = asyncio.new_event_loop()
    try:
        # The armed flush is overdue after twice the delay: the next line writes both.
        handler._flush_due = 1.0
        loop.run_until_complete(log_one("second"))
    finally:
        loop.close()
    assert [x["msg"] for x in _lines(stream)] == ["first", "second"]


@contextlib.contextmanager
def sole_handler():
    """A JsonLineHandler that alone receives fedrpc.calls, as configure_logging sets it up.

    pytest's own capture handlers (it adds them for each test phase) are set
    aside meanwhile: with them there, call records take the standard route.
    """
    handler, stream = _handler()
    calls = logging.getLogger("fedrpc.calls")
    level, propagate, handlers = calls.level, calls.propagate, calls.handlers
    calls.handlers = [handler]
    calls.setLevel(logging.INFO)
    calls.propagate = False
    # A batch boundary: a sink chosen by an earlier test would be trusted until it flushes.
    call_log._call_sink = None
    try:
        yield handler, stream
    finally:
        calls.handlers = handlers
        calls.setLevel(level)
        calls.propagate = propagate
        call_log._call_sink = None


async def test_call_lines_take_the_direct_route_and_keep_order():
    with sole_handler() as (handler, stream):
        log_call("system.ping", "org:o", 0.0000172, "r1", "ok", None)
        handler.emit(_record("between"))
        log_call("orgs.get", "org:o", 0.0012345, "r2", "not_found", 1004)
        assert call_log._call_sink is handler
        handler.flush()
    lines = _lines(stream)
    assert [x["msg"] for x in lines] == ["rpc.call", "between", "rpc.call"]
    assert (lines[0]["duration_ms"], lines[2]["duration_ms"]) == (0.017, 1.235)
    assert "code" not in lines[0] and lines[2]["code"] == 1004


async def test_a_handler_added_later_gets_call_lines_from_the_next_batch():
    with sole_handler() as (handler, stream):
        log_call("system.ping", "org:o", 0.001, "r1", "ok", None)
        other, other_stream = _handler()
        logging.getLogger("fedrpc.calls").addHandler(other)
        handler.flush()  # the batch ends: the set-up is looked up again
        log_call("system.ping", "org:o", 0.001, "r2", "ok", None)
        handler.flush()
        other.flush()
    assert [x["request_id"] for x in _lines(stream)] == ["r1", "r2"]
    assert [x["request_id"] for x in _lines(other_stream)] == ["r2"]
    assert call_log._call_sink is None
