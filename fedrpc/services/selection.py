"""Choosing the devices of a pending round, and recording how they were chosen.

The eligible population is read and the selection written in one
transaction that holds the round's row lock, so two calls cannot both
select. The seed, the criteria, the eligible count, the method and the
sampling rate are stored with the round: the privacy accountant is charged
with the rate the selection actually used.

A round with differential privacy is selected by Poisson sampling at
``q = min(1, target_device_count / eligible, criteria.fraction)``
(:func:`fedrpc.fl.sampling.poisson_rate`); stratified selection is refused
for it, since no accountant here covers it. Its charge to the federation's
ledger is recorded in the same transaction as the draw, before the draw is
seen by anyone: a round cancelled after selection, or drawn empty, has been
charged all the same, so selecting, looking and cancelling until a wanted
device is drawn costs budget every time (docs/privacy.md, "Selection"). An
empty draw fails the round; a new round is a new, charged draw. The charge is
priced in the app's math pool when given one (``pool``), so a (noise, rate)
pair new to the process is not priced on the event loop.
"""

from __future__ import annotations

import secrets

import msgspec
import numpy as np

from fedrpc.db import Database, jsonb
from fedrpc.errors import BadRequest, PreconditionFailed
from fedrpc.fl.privacy import RoundCharge
from fedrpc.fl.sampling import poisson_rate, poisson_select
from fedrpc.fl.sampling import select_devices as sample
from fedrpc.math_pool import MathPool
from fedrpc.services.privacy_budget import charge_round
from schemas.training import Criteria, Round

EMPTY_DRAW = (
    "the Poisson draw selected no device; the round failed and its draw was charged "
    "(create a new round to draw again)"
)


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
    db: Database,
    round_id: str,
    org_ids: list[str],
    c: Criteria,
    *,
    pool: MathPool | None = None,
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
        if locked.dp_config is not None:
            selection = _poisson(eligible, locked, c, seed)
            charge = RoundCharge(locked.dp_config["noise_multiplier"], selection.sample_rate, 1)
            await charge_round(tx, locked.federation_id, round_id, charge, pool=pool)
        else:
            selection = _fixed_size(eligible, locked, c, seed)
        await tx.run(
            "training.insert_round_devices", round_id=round_id, device_ids=selection.chosen
        )
        await tx.run(
            "training.update_round_selected",
            round_id=round_id,
            seed=seed,
            criteria=jsonb(c),
            eligible_count=selection.eligible_count,
            method=selection.method,
            sample_rate=selection.sample_rate,
        )
        if not selection.chosen:
            await tx.run(
                "training.update_round_failed_empty_draw",
                round_id=round_id,
                reason=EMPTY_DRAW,
            )
    if not selection.chosen:
        raise PreconditionFailed(EMPTY_DRAW, state="failed", sample_rate=selection.sample_rate)
    return selection


def _fixed_size(eligible: list[EligibleDevice], rnd: Round, c: Criteria, seed: int) -> Selection:
    """A round without DP: up to target_device_count devices, uniformly (or per platform)."""
    chosen = sample(
        [(d.id, d.platform) for d in eligible],
        rnd.target_device_count,
        np.random.default_rng(seed),
        fraction=c.fraction,
        stratify=c.stratify_by_platform,
    )
    if not chosen:
        raise PreconditionFailed("no device meets the criteria", state=rnd.state, eligible_count=0)
    return Selection(
        chosen=chosen,
        eligible_count=len(eligible),
        seed=seed,
        method="stratified" if c.stratify_by_platform else "uniform",
        sample_rate=len(chosen) / len(eligible),
    )


def _poisson(eligible: list[EligibleDevice], rnd: Round, c: Criteria, seed: int) -> Selection:
    """A DP round's selection: each eligible device independently with probability q."""
    if c.stratify_by_platform:
        raise BadRequest(
            "stratified selection is not accounted for differential privacy; "
            "a DP round is selected by Poisson sampling",
            field="criteria.stratify_by_platform",
        )
    if not eligible:
        raise PreconditionFailed("no device meets the criteria", state=rnd.state, eligible_count=0)
    q = poisson_rate(rnd.target_device_count, len(eligible), c.fraction)
    chosen = poisson_select([d.id for d in eligible], q, np.random.default_rng(seed))
    return Selection(
        chosen=chosen, eligible_count=len(eligible), seed=seed, method="poisson", sample_rate=q
    )


def poisson_selected(rnd: Round) -> bool:
    """Whether the round's devices were drawn by Poisson sampling, with its rate recorded."""
    return (
        rnd.selection_method == "poisson"
        and rnd.sample_rate is not None
        and bool(rnd.eligible_count)
    )


def expected_cohort(rnd: Round) -> float:
    """``q N``, a Poisson-selected round's expected cohort: the DP estimator's fixed denominator."""
    if not poisson_selected(rnd):
        raise PreconditionFailed("the round was not selected by Poisson sampling", state=rnd.state)
    return float(rnd.sample_rate or 0.0) * int(rnd.eligible_count or 0)
