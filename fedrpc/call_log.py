"""The one JSON log line per call, and the JSON formatter for every other record."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

import msgspec

call_log = logging.getLogger("fedrpc.calls")
# default=str as json.dumps had it: anything msgspec cannot encode is written as its str().
_encode_line = msgspec.json.Encoder(enc_hook=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, then the record's ``fields``."""

    _stamp: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        text = self.line(
            record.created,
            _LEVELS.get(record.levelname) or record.levelname.lower(),
            record.name,
            record.getMessage(),
            getattr(record, "fields", {}),
            self.formatException(record.exc_info) if record.exc_info else None,
        )
        return text

    def line(
        self,
        created: float,
        level: str,
        logger: str,
        msg: str,
        fields: dict[str, Any],
        exc: str | None = None,
    ) -> str:
        """The JSON line of one record, from its parts."""
        entry = {"ts": self.stamp(created), "level": level, "logger": logger, "msg": msg}
        entry.update(fields)
        if exc is not None:
            entry["exc"] = exc
        return _encode_line(entry).decode()

    def stamp(self, created: float) -> str:
        """The ``ts`` of a line: UTC, whole seconds, formatted once per second."""
        second, stamp = self._stamp
        if int(created) != second:
            second = int(created)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
            self._stamp = (second, stamp)
        return stamp


class _CallLine(msgspec.Struct, omit_defaults=True):
    """A call's line as JsonFormatter writes it for a CallRecord: same keys, same order."""

    ts: str
    level: str
    logger: str
    msg: str
    method: str
    principal: str
    duration_ms: float
    request_id: str
    outcome: str
    code: int | None = None


#: A call waiting to be written: (time.time(), method, principal, seconds, request_id, outcome, code).
PendingCall = tuple[float, str, str, float, str, str, "int | None"]

_encode_call_lines = msgspec.json.Encoder().encode_lines


_MAX_PENDING_LINES = 256
#: How long a line logged on the event loop may wait to be written with others.
FLUSH_DELAY_SECONDS = 0.05


class JsonLineHandler(logging.StreamHandler):
    """Writes one line per record, in batches.

    A line waits in memory until a flush armed by the first line of its batch
    runs on the event loop, :data:`FLUSH_DELAY_SECONDS` later; then every
    waiting line is written at once: one system call serves hundreds of calls
    under load. (Writing once per loop iteration instead cost about 5 us of a
    ~120 us ``system.ping``, measured with wrk.) A full buffer (256 lines), a
    line logged with no flush armed and no running loop (a command-line tool, a
    worker thread between batches), a line logged when the armed flush is
    overdue (its loop stopped), and ``flush()`` (which ``logging.shutdown``
    calls at exit) write what is waiting at once.

    Call lines wait as plain tuples and are formatted when they are written,
    many in one go: formatting each one inside its request cost several
    microseconds more, most of it cache misses on a path that runs once per
    request. For the same reason a line does not look the running loop up
    (``asyncio.get_running_loop`` makes a ``getpid`` system call): only the
    first line of a batch does.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        # Formatted lines (str), and calls still as tuples (see queue).
        self._pending: list[str | PendingCall] = []
        # 0.0 when no flush is armed, else the time.time() by which the armed one is overdue.
        self._flush_due = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_line(self, line: str) -> None:
        """Queue one formatted line, without its newline, as :meth:`emit` does."""
        self.queue(line + "\n", time.time())

    def queue(self, item: str | PendingCall, now: float) -> None:
        """Queue a formatted line (with its newline) or a call, to be formatted as
        JsonFormatter would a CallRecord; ``now`` is ``time.time()``."""
        lock = self.lock
        lock.acquire()  # type: ignore[union-attr]  # worker threads log too; `with` costs more
        try:
            self._pending.append(item)
            pending = len(self._pending)
        finally:
            lock.release()  # type: ignore[union-attr]
        if pending >= _MAX_PENDING_LINES or now > self._flush_due:
            self._write_soon(pending, now)

    def _write_soon(self, pending: int, now: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or pending >= _MAX_PENDING_LINES or self._flush_due:
            self.flush()  # no loop to wait on, a full buffer, or an armed flush that never ran
            return
        self._flush_due = now + 2 * FLUSH_DELAY_SECONDS
        loop.call_later(FLUSH_DELAY_SECONDS, self._flush_soon)

    def flush(self) -> None:
        global _call_sink
        with self.lock:  # type: ignore[union-attr]  # logging.Handler always creates its lock
            if _call_sink is self:
                _call_sink = None  # look the set-up up again for the next batch
            self._flush_due = 0.0
            lines, self._pending = _joined(self._pending), []
            if self.stream and hasattr(self.stream, "flush"):
                if lines:
                    self.stream.write(lines)
                self.stream.flush()

    def _flush_soon(self) -> None:
        # An exception here would reach the loop's handler, which logs it through this
        # handler again, and so on at every iteration: report it the way emit() would.
        try:
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "(buffered log lines)"}))


def _joined(pending: list[str | PendingCall]) -> str:
    parts: list[str] = []
    run: list[_CallLine] = []
    second, ts = -1, ""
    for item in pending:
        if type(item) is str:
            if run:
                parts.append(_encode_call_lines(run).decode())
                run = []
            parts.append(item)
            continue
        created, method, principal, seconds, request_id, outcome, code = item
        if int(created) != second:  # ts changes once a second: no call per line
            second, ts = int(created), _CALL_STAMPS.stamp(created)
        run.append(
            _CallLine(
                ts,
                "info",
                "fedrpc.calls",
                "rpc.call",
                method,
                principal,
                int(seconds * 1_000_000 + 0.5) / 1000,  # as _milliseconds(seconds)
                request_id,
                outcome,
                code,
            )
        )
    if run:
        parts.append(_encode_call_lines(run).decode())
    return "".join(parts)


_CALL_STAMPS = JsonFormatter()  # its per-second cache of ts strings


def _milliseconds(seconds: float) -> float:
    # Whole microseconds as milliseconds: k / 1000 prints as k's digits (round() is 4x slower).
    return int(seconds * 1_000_000 + 0.5) / 1000


def configure_logging(level: str = "INFO") -> None:
    handler = JsonLineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


_LEVELS = {name: name.lower() for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}
_PROCESS: tuple[int, str | None] = (0, None)


def _process() -> tuple[int, str | None]:
    """The pid and multiprocessing name a LogRecord would carry (re-read after a fork)."""
    global _PROCESS
    mp = sys.modules.get("multiprocessing")
    _PROCESS = (os.getpid(), mp.current_process().name if mp is not None else "MainProcess")
    return _PROCESS


os.register_at_fork(after_in_child=_process)


_CALL_RECORD_CONSTANTS = {
    "name": call_log.name,
    "msg": "rpc.call",
    "args": (),
    "levelname": "INFO",
    "levelno": logging.INFO,
    "pathname": "(unknown file)",
    "filename": "(unknown file)",
    "module": "(unknown file)",
    "lineno": 0,
    "funcName": "(unknown function)",
    "exc_info": None,
    "exc_text": None,
    "stack_info": None,
    "taskName": None,
}


class CallRecord(logging.LogRecord):
    """The record of one call, built without what ``LogRecord.__init__`` spends per record.

    ``Logger.info`` walks the stack for a source line and recomputes the
    constant attributes for every record; this sets the same attributes (the
    ones logging records when it does not look up the caller) and passes the
    record to the same handlers through ``Logger.handle``.
    """

    def __init__(self, fields: dict[str, Any]) -> None:
        # In the instance's __dict__, not on the class: %-style formatters read record.__dict__.
        self.__dict__.update(_CALL_RECORD_CONSTANTS)
        created = time.time()
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - logging._startTime) * 1000
        self.thread = threading.get_ident()
        self.threadName = threading.current_thread().name
        self.process, self.processName = _PROCESS if _PROCESS[0] else _process()
        self.fields = fields


def log_call(
    method: str, principal: str, seconds: float, request_id: str, outcome: str, code: int | None
) -> None:
    """Log the one line of a call (logger ``fedrpc.calls``, message ``rpc.call``)."""
    handler = _call_sink or _find_call_sink()
    if handler is not None:
        # The handler formats the line when it writes it, as it would have from a record:
        # a record and its trip through logging cost about as much as a ping.
        now = time.time()
        handler.queue((now, method, principal, seconds, request_id, outcome, code), now)
        return
    if not call_log.isEnabledFor(logging.INFO):
        return
    fields = {
        "method": method,
        "principal": principal,
        "duration_ms": _milliseconds(seconds),
        "request_id": request_id,
        "outcome": outcome,
    }
    if code is not None:
        fields["code"] = code
    call_log.handle(CallRecord(fields))


#: The handler found by :func:`_find_call_sink`, trusted until it next writes its lines.
_call_sink: JsonLineHandler | None = None


def _find_call_sink() -> JsonLineHandler | None:
    """The JsonLineHandler that alone receives the call records, unfiltered, if that is the set-up.

    That is the set-up :func:`configure_logging` makes; anything else (a test's
    capture handler, a filter) takes the standard path through ``Logger.handle``.
    The answer is kept until that handler next writes its lines (at most
    :data:`FLUSH_DELAY_SECONDS` later): looking it up again for every call
    touched a dozen objects that are rarely in the cache, about 2 us of a ping.
    So a change to logging's levels, handlers or filters reaches call lines
    from the next batch on.
    """
    global _call_sink
    if not call_log.isEnabledFor(logging.INFO):
        return None
    found = None
    logger: logging.Logger | None = call_log
    while logger is not None:
        if logger.filters:
            return None
        for handler in logger.handlers:
            if (
                found is not None
                or type(handler) is not JsonLineHandler
                or handler.filters
                or handler.level > logging.INFO
                or type(handler.formatter) is not JsonFormatter
            ):
                return None
            found = handler
        if not logger.propagate:
            break
        logger = logger.parent
    _call_sink = found
    return found
