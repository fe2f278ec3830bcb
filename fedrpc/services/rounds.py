"""Round state changes: one conditional UPDATE each, so a transition is atomic.

An illegal transition is ``precondition_failed`` with the round's current
state in ``data.state``.
"""

from __future__ import annotations

from fedrpc.db import Database
from fedrpc.errors import NotFound, PreconditionFailed


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
