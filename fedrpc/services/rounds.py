"""Round state changes: one conditional UPDATE each, so a transition is atomic.

An illegal transition is ``precondition_failed`` with the round's current
state in ``data.state``.
"""

from __future__ import annotations

from fedrpc.auth import new_id
from fedrpc.db import Database, jsonb
from fedrpc.errors import NotFound, PreconditionFailed
from schemas.training import CreateRoundParams


async def transition(
    db: Database, query: str, round_id: str, allowed: tuple[str, ...], **params
) -> None:
    """Run the UPDATE ``query`` (guarded by its own WHERE state IN ...) or explain why it did nothing."""
    if await db.run(query, round_id=round_id, **params):
        return
    state = await db.value("training.find_round_state", round_id=round_id)
    if state is None:
        raise NotFound("no round with this id")
    raise PreconditionFailed(
        f"the round is {state}; this needs it to be {' or '.join(allowed)}",
        state=state,
        allowed=list(allowed),
    )


async def insert_round(db: Database, org_id: str, p: CreateRoundParams, min_updates: int) -> str:
    """Store a new pending round of ``org_id`` (its rules already checked); returns its id."""
    return await db.value(
        "training.insert_round",
        id=new_id("rnd"),
        org_id=org_id,
        model_id=p.model_id,
        base_version=p.base_version,
        federation_id=p.federation_id,
        target_device_count=p.target_device_count,
        min_updates=min_updates,
        deadline_seconds=p.deadline_seconds,
        update_format=p.update_format,
        strategy=p.strategy.name,
        strategy_params=jsonb(p.strategy.params),
        client_config=jsonb(p.client_config),
        dp_config=jsonb(p.differential_privacy) if p.differential_privacy else None,
        secagg_config=jsonb(p.secure_aggregation) if p.secure_aggregation else None,
        auto_aggregate=p.auto_aggregate,
        max_sample_count=p.max_sample_count,
        max_update_norm=p.max_update_norm,
    )
