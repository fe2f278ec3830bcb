"""What devices report for federated analytics: check a whole batch, then store all of it.

A batch is stored in one transaction or not at all. The first bad row names
its index (``data.index``): a value that is not finite, both a value and a
category, a ``recorded_at`` without a time zone or further ahead than the
allowed clock skew, a variable that a federation of the device's organization
does not declare (where its federations declare variables), or one of the
other kind than declared, than the organization's earlier reports, or than
an earlier row of the batch. The server attaches the device's organization,
platform and device groups; nothing of that is taken from the device.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from fedrpc.db import Database
from fedrpc.errors import BadRequest
from schemas.analytics import Observation

#: How far ahead of the server's clock a device's recorded_at may be.
CLOCK_SKEW = timedelta(minutes=5)


class _Device(msgspec.Struct):
    platform: str
    group_ids: list[str]


class _Declared(msgspec.Struct):
    federation_id: str
    variables: dict[str, Any]


class _Kind(msgspec.Struct):
    name: str
    kind: str


def _bad(index: int, reason: str) -> BadRequest:
    return BadRequest(
        f"observation {index}: {reason}; nothing was stored", field="observations", index=index
    )


def kind_of(o: Observation) -> str | None:
    """numeric, categorical, or None for a missing value (it fits either kind)."""
    if o.value is not None:
        return "numeric"
    return None if o.category is None else "categorical"


def declared_kinds(declarations: list[_Declared]) -> dict[str, set[str]] | None:
    """Variable name -> the kinds its declarations give; None when no federation declares any."""
    if not declarations:
        return None
    kinds: dict[str, set[str]] = {}
    for d in declarations:
        for name, kind in d.variables.items():
            kinds.setdefault(name, set()).add(kind)
    return kinds


def check_rows(
    rows: list[Observation], declared: dict[str, set[str]] | None, now: datetime
) -> dict[str, str]:
    """The kind of each variable the batch fixes; raises for the first bad row."""
    seen: dict[str, str] = {}
    for i, o in enumerate(rows):
        kind = kind_of(o)
        if o.value is not None and o.category is not None:
            raise _bad(i, "give a value or a category, not both")
        if o.value is not None and not math.isfinite(o.value):
            raise _bad(i, "value must be a finite number")
        if o.recorded_at.tzinfo is None:
            raise _bad(i, "recorded_at needs a time zone (e.g. Z)")
        if o.recorded_at > now + CLOCK_SKEW:
            raise _bad(i, "recorded_at is in the future")
        if declared is not None:
            if o.variable not in declared:
                raise _bad(i, f"variable {o.variable!r} is not declared by your federations")
            if kind is not None and declared[o.variable] != {kind}:
                raise _bad(i, f"variable {o.variable!r} is declared {_one(declared[o.variable])}")
        if kind is not None:
            if seen.setdefault(o.variable, kind) != kind:
                raise _bad(i, f"variable {o.variable!r} is {seen[o.variable]} earlier in the batch")
    return seen


def _one(kinds: set[str]) -> str:
    return " and ".join(sorted(kinds))


async def report(
    db: Database, device_id: str, org_id: str, rows: list[Observation], max_rows: int
) -> int:
    """Check and store one device's batch; the number of observations stored."""
    if len(rows) > max_rows:
        raise _bad(max_rows, f"a batch holds at most {max_rows} observations")
    async with db.transaction() as tx:
        device = await tx.get("analytics.find_reporting_device", _Device, device_id=device_id)
        declarations = await tx.all("analytics.list_declared_variables", _Declared, org_id=org_id)
        kinds = check_rows(rows, declared_kinds(declarations), datetime.now(UTC))
        if kinds:
            names = sorted(kinds)
            await tx.run(
                "analytics.upsert_variable_kinds",
                org_id=org_id,
                names=names,
                kinds=[kinds[n] for n in names],
            )
            fixed = await tx.all("analytics.list_variable_kinds", _Kind, org_id=org_id, names=names)
            clash = {k.name: k.kind for k in fixed if k.kind != kinds[k.name]}
            if clash:
                i = next(i for i, o in enumerate(rows) if o.variable in clash and kind_of(o))
                raise _bad(i, f"variable {rows[i].variable!r} is {clash[rows[i].variable]}")
        await tx.run(
            "analytics.insert_observations",
            device_id=device_id,
            org_id=org_id,
            platform=device.platform,
            group_ids=device.group_ids,
            variables=[o.variable for o in rows],
            values=[o.value for o in rows],
            categories=[o.category for o in rows],
            recorded_at=[o.recorded_at for o in rows],
        )
    return len(rows)
