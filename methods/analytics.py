"""analytics.report: a device reports observations for its federations' analytics."""

from __future__ import annotations

from fedrpc.context import Context
from fedrpc.registry import DEVICE, rpc_method
from fedrpc.services import analytics_data
from schemas.analytics import ReportParams, ReportResult


@rpc_method(DEVICE)
async def report(ctx: Context, p: ReportParams) -> ReportResult:
    """Store the batch, or nothing: the first bad row is named in `data.index` (`bad_request`).

    A device reports only as itself; its organization, platform and device
    groups are attached by the server. Replays with the same idempotency key
    store nothing twice.
    """
    accepted = await analytics_data.report(
        ctx.db,
        ctx.device_id,
        ctx.org_id,
        p.observations,
        ctx.settings.analytics_max_observations,
    )
    return ReportResult(accepted=accepted)
