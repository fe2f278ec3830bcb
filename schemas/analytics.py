"""analytics.report: observations a device reports for federated analytics (docs/analytics.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from msgspec import Meta

from schemas._base import MutatingParams, Params, Result

VariableName = Annotated[
    str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_.:-]*$")
]
Category = Annotated[str, Meta(min_length=1, max_length=128)]
#: The schema's ceiling; the server's FEDRPC_ANALYTICS_MAX_OBSERVATIONS may be lower.
MAX_OBSERVATIONS = 100_000


class Observation(Params, kw_only=True):
    """One measurement: a number (value) or a category; neither means the variable is missing."""

    variable: VariableName
    value: (
        Annotated[
            float,
            Meta(ge=-1e15, le=1e15, description="Bounded so that no sum of squares overflows."),
        ]
        | None
    ) = None
    category: Category | None = None
    # msgspec publishes a datetime as a bare string: say which strings decode.
    recorded_at: Annotated[
        datetime,
        Meta(
            extra_json_schema={"format": "date-time"},
            description="RFC 3339 with a time zone, e.g. 2026-01-01T00:00:00Z",
        ),
    ]


class ReportParams(MutatingParams, kw_only=True):
    """Report this device's observations; the whole batch is stored or none of it."""

    observations: Annotated[list[Observation], Meta(min_length=1, max_length=MAX_OBSERVATIONS)]


class ReportResult(Result, kw_only=True):
    accepted: int
