"""Choosing the devices of a pending round, and recording how they were chosen.

The eligible population is read and the selection written in one
transaction that holds the round's row lock, so two calls cannot both
select. The seed, the criteria, the eligible count, the method and the
sampling rate are stored with the round: the privacy accountant is charged
with the rate the selection actually used.
"""

from __future__ import annotations

import secrets

import msgspec
import numpy as np

from fedrpc.db import Database, jsonb
from fedrpc.errors import PreconditionFailed
from fedrpc.fl.sampling import select_devices as sample
from schemas.training import Criteria, Round


class EligibleDevice(msgspec.Struct):
    id: str
    platform: str


class Selection(msgspec.Struct, kw_only=True):
    chosen: list[str]
    eligible_count: int
    seed: int
    method: str
    sample_rate: float


async def select_for_round(
    db: Database, round_id: str, org_ids: list[str], c: Criteria
) -> Selection:
    """Select devices of ``org_ids`` meeting ``c`` for the pending round ``round_id``."""
    async with db.transaction() as tx:
        locked = await tx.get("training.lock_round", Round, round_id=round_id)
        if locked.state != "pending":
            raise PreconditionFailed(
                f"the round is {locked.state}; selection needs it pending",
                state=locked.state,
                allowed=["pending"],
            )
        eligible = await tx.all(
            "training.list_eligible_devices",
            EligibleDevice,
            org_ids=org_ids,
            platform=c.platform,
            network_type=c.network_type,
            charging=c.charging,
            min_battery=c.min_battery,
            heartbeat_max_age_seconds=c.heartbeat_max_age_seconds,
            device_group_id=c.device_group_id,
            min_app_version=c.min_app_version,
            max_app_version=c.max_app_version,
        )
        seed = secrets.randbits(63)
        chosen = sample(
            [(d.id, d.platform) for d in eligible],
            locked.target_device_count,
            np.random.default_rng(seed),
            fraction=c.fraction,
            stratify=c.stratify_by_platform,
        )
        if not chosen:
            raise PreconditionFailed(
                "no device meets the criteria", state=locked.state, eligible_count=0
            )
        selection = Selection(
            chosen=chosen,
            eligible_count=len(eligible),
            seed=seed,
            method="stratified" if c.stratify_by_platform else "uniform",
            sample_rate=len(chosen) / len(eligible),
        )
        await tx.run("training.insert_round_devices", round_id=round_id, device_ids=chosen)
        await tx.run(
            "training.update_round_selected",
            round_id=round_id,
            seed=seed,
            criteria=jsonb(c),
            eligible_count=selection.eligible_count,
            method=selection.method,
            sample_rate=selection.sample_rate,
        )
    return selection
