"""Postgres access: named queries from sql/queries, typed helpers, migrations.

The only module that touches psycopg. A query is addressed by its dotted file
path plus its ``-- name:``: ``sql/queries/devices/groups.sql`` block
``list_groups`` is ``devices.groups.list_groups``. Database errors become
application errors here and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from fedrpc.errors import BadRequest, Conflict, NotFound
from fedrpc.group_commit import GroupCommit, encode_calls

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
QUERY_DIR = SQL_DIR / "queries"
MIGRATION_DIR = SQL_DIR / "migrations"

T = TypeVar("T")
_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.M)


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    doc: str
    sql: str


def load_queries(root: Path = QUERY_DIR) -> dict[str, Query]:
    """Read every ``-- name:`` block under ``root``; a name may appear once."""
    queries: dict[str, Query] = {}
    for path in sorted(root.rglob("*.sql")):
        prefix = ".".join(path.relative_to(root).with_suffix("").parts)
        text = path.read_text()
        marks = list(_NAME.finditer(text))
        for mark, nxt in zip(marks, marks[1:] + [None], strict=True):
            body = text[mark.end() : nxt.start() if nxt else len(text)].strip()
            lines = body.splitlines()
            doc = lines[0].lstrip("- ").strip() if lines and lines[0].startswith("--") else ""
            sql = "\n".join(line for line in lines if not line.lstrip().startswith("--")).strip()
            name = f"{prefix}.{mark.group(1)}"
            if name in queries:
                raise ValueError(f"query {name} is defined twice")
            if not sql:
                raise ValueError(f"query {name} has no SQL")
            queries[name] = Query(name, doc, sql)
    return queries


def jsonb(value: Any) -> Jsonb:
    """Wrap a value for a jsonb parameter, encoded by msgspec (handles Structs)."""
    return Jsonb(value, dumps=_encode_json)


def _encode_json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


NUL_MESSAGE = "text values must not contain the NUL character (U+0000)"
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
"""A JSON ``\\u0000`` escape that is not itself an escaped backslash followed by ``u0000``."""


def refuse_nul(params: dict[str, Any]) -> None:
    """The one rule for U+0000: neither text nor jsonb can store it, so such a value is a
    BadRequest before any statement is sent (``run``, every read, and ``coalesced``, whose
    other calls therefore never share a failed batch with it)."""
    for value in params.values():
        if _holds_nul(value):
            raise BadRequest(NUL_MESSAGE, reason="nul_character")


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, (bytes, bytearray, memoryview, int, float, bool)) or value is None:
        return False  # bytea and numbers hold anything
    if isinstance(value, Jsonb):
        return _holds_nul(value.obj)
    if isinstance(value, msgspec.Raw):
        raw = bytes(value)
        return b"\\u0000" in raw and _JSON_NUL.search(raw) is not None
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_nul(v) for v in value)
    if isinstance(value, msgspec.Struct):
        return any(_holds_nul(v) for v in msgspec.structs.astuple(value))
    return False


CONSTRAINT_MESSAGES: dict[str, str] = {}
"""Constraint name -> the conflict message a client sees; filled by the SQL's owners."""


def constraint_message(name: str, message: str) -> None:
    CONSTRAINT_MESSAGES[name] = message


@contextmanager
def translated_errors() -> Iterator[None]:
    """Turn database errors a client can cause into application errors."""
    try:
        yield
    except pg_errors.UniqueViolation as exc:
        name = exc.diag.constraint_name or ""
        raise Conflict(
            CONSTRAINT_MESSAGES.get(name, "a record with these values already exists"),
            constraint=name,
        ) from None
    except pg_errors.ForeignKeyViolation:
        raise NotFound("a referenced record does not exist") from None
    except (pg_errors.UntranslatableCharacter, pg_errors.CharacterNotInRepertoire):
        # Only a value `refuse_nul` cannot see into gets here (e.g. JSON built in SQL).
        raise BadRequest(NUL_MESSAGE, reason="nul_character") from None
    except (
        pg_errors.CheckViolation,
        pg_errors.NumericValueOutOfRange,
        pg_errors.StringDataRightTruncation,
        pg_errors.InvalidTextRepresentation,
    ):
        raise BadRequest("a value is out of the range the server accepts") from None


class Database:
    """Typed helpers over named queries; ``transaction()`` pins one connection."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        queries: dict[str, Query],
        conn: psycopg.AsyncConnection | None = None,
    ) -> None:
        self.pool = pool
        self.queries = queries
        self._conn = conn
        self._groups: dict[str, GroupCommit] = {}

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        if self._conn is not None:
            async with self._conn.transaction():
                yield self
            return
        async with self.pool.connection() as conn, conn.transaction():
            yield Database(self.pool, self.queries, conn)

    async def ping(self) -> bool:
        """Readiness: can a connection run a trivial statement?"""
        try:
            async with self.pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
            return True
        except Exception:  # readiness probe: any failure means "not ready"
            return False

    async def _rows(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        sql = self.queries[name].sql
        refuse_nul(params)
        with translated_errors():
            if self._conn is not None:
                return await _fetch(self._conn, sql, params)
            async with self.pool.connection() as conn:
                return await _fetch(conn, sql, params)

    async def get(
        self, query: str, type_: type[T], /, *, missing: str | None = None, **params: Any
    ) -> T:
        """Exactly one row, converted to ``type_``; none is NotFound."""
        rows = await self._rows(query, params)
        if not rows:
            raise NotFound(missing or f"{type_.__name__.lower()} not found")
        return msgspec.convert(rows[0], type_)

    async def maybe(self, query: str, type_: type[T], /, **params: Any) -> T | None:
        rows = await self._rows(query, params)
        return msgspec.convert(rows[0], type_) if rows else None

    async def all(self, query: str, type_: type[T], /, **params: Any) -> list[T]:
        return msgspec.convert(await self._rows(query, params), list[type_])

    async def column(self, query: str, /, **params: Any) -> list[Any]:
        """The first column of every row."""
        return [next(iter(row.values())) for row in await self._rows(query, params)]

    async def value(self, query: str, /, **params: Any) -> Any:
        """The first column of the first row, or None when there is no row."""
        rows = await self._rows(query, params)
        return next(iter(rows[0].values())) if rows else None

    async def coalesced(
        self, query: str, type_: type[T], /, *, key: str, **params: Any
    ) -> T | None:
        """``maybe`` for a statement that serves many calls at once (group commit).

        The calls of ``query`` made in the same event-loop turn run as one statement. It
        receives ``%(calls)s``, a JSON array with one object per distinct ``key`` value holding
        that call's parameters (msgspec-encoded, so ``msgspec.Raw`` passes JSON through), and
        ``%(keys)s``, those key values as an array (for an index lookup: the planner cannot
        count the rows of a JSON document). It returns at most one row per key, with the key
        in its ``key`` column; each caller gets the row of its own key, or None. Two calls
        with the same key in one turn are merged, a later non-null parameter replacing an
        earlier one, so the statement must read a null as "keep the stored value". When the
        statement fails for any reason but a lost connection, every call is retried alone, so
        an error stays with its call. Inside ``transaction()`` the call runs alone on the
        transaction's connection.
        """
        refuse_nul(params)  # before the batch: a call that cannot succeed never joins one
        if self._conn is not None:
            return await self._alone(query, type_, key, params)
        group = self._groups.get(query)
        if group is None:
            group = self._groups[query] = GroupCommit(self, query, type_, key)
        return await group.submit(params)

    async def _alone(
        self, query: str, type_: type[T], key: str, params: dict[str, Any]
    ) -> T | None:
        rows = await self.all(query, type_, calls=encode_calls([params]), keys=[params[key]])
        return rows[0] if rows else None

    async def run(self, query: str, /, **params: Any) -> int:
        """Execute a statement; returns the number of rows it touched."""
        sql = self.queries[query].sql
        refuse_nul(params)
        with translated_errors():
            if self._conn is not None:
                return await _execute(self._conn, sql, params)
            async with self.pool.connection() as conn:
                return await _execute(conn, sql, params)


async def _fetch(
    conn: psycopg.AsyncConnection, sql: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return await cur.fetchall() if cur.description else []


async def _execute(conn: psycopg.AsyncConnection, sql: str, params: dict[str, Any]) -> int:
    async with conn.cursor() as cur:
        await cur.execute(sql, params)
        return cur.rowcount


async def _configure(conn: psycopg.AsyncConnection) -> None:
    await conn.execute("SET TIME ZONE 'UTC'")


def open_pool(conninfo: str, *, min_size: int = 2, max_size: int = 10) -> AsyncConnectionPool:
    """An unopened pool; open it with ``await pool.open(wait=True)``."""
    return AsyncConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        open=False,
        configure=_configure,
        # A lone statement commits by itself (one round trip, not BEGIN + statement + COMMIT);
        # `Database.transaction()` opens an explicit transaction where several must commit together.
        kwargs={"autocommit": True},
    )


def set_json_codec() -> None:
    # msgspec reads jsonb columns faster than the json module and gives the same values.
    psycopg.types.json.set_json_loads(msgspec.json.decode)


MIGRATION_LOCK = 0x66656472  # "fedr": one migrator at a time across processes


async def migrate(conninfo: str) -> list[str]:
    """Apply the migrations not yet recorded, in order; returns the ones applied."""
    applied: list[str] = []
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for path in sorted(MIGRATION_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
                if path.stem in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES (%s)", (path.stem,)
                    )
                applied.append(path.stem)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied
