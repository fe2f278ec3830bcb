"""Who may do what with a model, a version, a round or a federation: one place.

Every handler asks this module and never repeats a rule. The rules:

- An organization reads its own models and the models shared into federations
  it is an active member of; its devices read what it reads.
- Only the organization that owns a model changes it: new versions, publishing
  drafts, rounds on it (and so aggregation into it and its server optimizer
  state). Federation members take part with their devices and read the shared
  model's published versions; a draft exists only for its owner.
- A federation round runs the owner's model shared into that federation; the
  federation decides how many updates its results mix (``min_round_updates``),
  that a budgeted federation trains only with differential privacy, and that
  strategies whose output can be one client's update need differential privacy.
- Only the owner changes a federation; its active members read it.
- An organization names only its own devices, device groups and keys (another
  organization's ids are ``forbidden``, checked before existence, so a guess
  learns nothing more than that the id is not the caller's).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import msgspec

from fedrpc.auth import Principal
from fedrpc.context import Context
from fedrpc.db import Database
from fedrpc.errors import BadRequest, Forbidden, NotFound, PreconditionFailed
from fedrpc.fl.aggregate import ROBUST
from schemas.devices import Owner
from schemas.federations import Federation
from schemas.models import Model
from schemas.models.versions import ModelVersion
from schemas.training import CreateRoundParams, OrgParticipation, Progress, Round

_SHOWN_IDS = 20


def require_org(principal: Principal, org_id: str) -> None:
    """The caller's organization must be ``org_id`` (an org sees only its own resources)."""
    if principal.org_id != org_id:
        raise Forbidden("the organization does not own this resource")


def require_owned(owners: list[Owner], wanted: Iterable[str], org_id: str, noun: str) -> None:
    """All wanted ids must be ``org_id``'s (else Forbidden, checked first) and exist (else NotFound)."""
    found = {o.id: o.org_id for o in owners}
    foreign = sorted(i for i, owner in found.items() if owner != org_id)
    if foreign:
        raise Forbidden(
            f"the organization does not own every {noun} named", ids=foreign[:_SHOWN_IDS]
        )
    missing = sorted(set(wanted) - found.keys())
    if missing:
        raise NotFound(f"no {noun} with these ids", ids=missing[:_SHOWN_IDS])


async def own_groups(db: Database, org_id: str, group_ids: list[str]) -> list[str]:
    """``group_ids``, once every one is known to be ``org_id``'s device group."""
    if group_ids:
        owners = await db.all("devices.groups.list_group_owners", Owner, group_ids=group_ids)
        require_owned(owners, group_ids, org_id, "device group")
    return group_ids


async def own_devices(db: Database, org_id: str, device_ids: list[str]) -> list[str]:
    """``device_ids``, once every one is known to be ``org_id``'s device."""
    owners = await db.all("devices.list_device_owners", Owner, device_ids=device_ids)
    require_owned(owners, device_ids, org_id, "device")
    return device_ids


async def _find_model(ctx: Context, model_id: str) -> Model:
    return await ctx.db.get(
        "models.find_model",
        Model,
        model_id=model_id,
        reader_org_id=ctx.org_id,
        missing="no model with this id",
    )


def sees_drafts(ctx: Context, model: Model) -> bool:
    """Draft versions exist for the organization that owns the model (and its devices) only."""
    return model.org_id == ctx.org_id


async def model_for_reading(ctx: Context, model_id: str) -> Model:
    """The model, if the caller's organization (or one of its devices) may read it."""
    model = await _find_model(ctx, model_id)
    if model.org_id != ctx.org_id and not await ctx.db.value(
        "federations.models.find_member_share", model_id=model_id, org_id=ctx.org_id
    ):
        raise Forbidden("the organization does not own this model")
    return model


async def model_for_writing(ctx: Context, model_id: str) -> Model:
    """The model, if the caller is the organization that owns it (an org key, not a device)."""
    model = await _find_model(ctx, model_id)
    if model.org_id != ctx.org_id or ctx.principal.kind != "org":
        raise Forbidden("only the organization that owns this model may change it")
    return model


async def version_for_reading(
    ctx: Context,
    model: Model,
    version: int | None,
    *,
    missing: str = "no such version of this model",
) -> ModelVersion:
    """A version of a readable model (the latest when ``version`` is None); drafts for the owner only."""
    return await ctx.db.get(
        "models.versions.get_version",
        ModelVersion,
        model_id=model.id,
        version=version,
        with_drafts=sees_drafts(ctx, model),
        missing=missing,
    )


async def version_to_train_from(ctx: Context, model: Model, version: int) -> ModelVersion:
    """A version a round or job may start from: visible to the caller and published."""
    found = await version_for_reading(
        ctx, model, version, missing="the model has no such base_version"
    )
    if not found.published:
        raise PreconditionFailed(
            f"version {version} is a draft; publish it with models.versions.publish "
            "before a round can start from it",
            published=False,
        )
    return found


class FederationRole(Federation, kw_only=True):
    role: str  # owner | active | invited | none


async def federation_role(ctx: Context, federation_id: str) -> FederationRole:
    return await ctx.db.get(
        "federations.find_federation_role",
        FederationRole,
        federation_id=federation_id,
        org_id=ctx.org_id,
        missing="no federation with this id",
    )


async def federation_for_member(ctx: Context, federation_id: str) -> Federation:
    """The federation, if the caller's organization owns it or is an active member."""
    found = await federation_role(ctx, federation_id)
    if found.role not in ("owner", "active"):
        raise Forbidden("the organization is not a member of this federation")
    return _plain(found)


async def federation_for_owner(ctx: Context, federation_id: str) -> Federation:
    """The federation, if the caller's organization owns it."""
    found = await federation_role(ctx, federation_id)
    if found.role != "owner":
        raise Forbidden("the organization does not own this federation")
    return _plain(found)


def _plain(found: FederationRole) -> Federation:
    fields = {f: getattr(found, f) for f in Federation.__struct_fields__}
    return msgspec.convert(fields, Federation)


async def model_for_round(
    ctx: Context, model_id: str, federation_id: str | None
) -> tuple[Model, Federation | None]:
    """The model a new round trains and its federation: the caller owns the model, and a
    federation round's model is shared into that federation (of which the caller is a member)."""
    model = await model_for_writing(ctx, model_id)
    if federation_id is None:
        return model, None
    return model, await federation_for_model(ctx, model, federation_id)


async def federation_for_model(
    ctx: Context, model: Model, federation_id: str, *, own_model_ok: bool = False
) -> Federation:
    """The federation, if the caller is a member and the model is shared into it (or, with
    ``own_model_ok``, is the caller's own model: its personalized state may be kept per
    federation without sharing it)."""
    federation = await federation_for_member(ctx, federation_id)
    if own_model_ok and model.org_id == ctx.org_id:
        return federation
    if not await ctx.db.value(
        "training.find_model_in_federation", model_id=model.id, federation_id=federation_id
    ):
        raise Forbidden("the model is not shared into this federation")
    return federation


def round_min_updates(p: CreateRoundParams, federation: Federation | None) -> int:
    """The fewest updates a new round aggregates: what the caller asks, at least what its
    federation demands, and never more than it selects."""
    if p.secure_aggregation is not None:
        check_secure_round(
            p.strategy.name,
            update_format=p.update_format,
            private=p.differential_privacy is not None,
        )
    if federation is None:
        if p.differential_privacy is not None:
            raise BadRequest(
                "differential_privacy needs a federation_id: its budget is the federation's",
                field="differential_privacy",
            )
        needed = p.min_updates
    else:
        check_federation_round(
            federation, strategy=p.strategy.name, private=p.differential_privacy is not None
        )
        needed = max(p.min_updates, federation.min_round_updates)
    if needed > p.target_device_count:
        raise BadRequest(
            f"the round needs {needed} updates (min_updates, or its federation's "
            "min_round_updates) but targets fewer devices",
            field="target_device_count",
            min_updates=needed,
        )
    return needed


def check_federation_round(federation: Federation, *, strategy: str, private: bool) -> None:
    """What a federation asks of every round in it, before anything is stored or aggregated."""
    if federation.total_epsilon_budget is not None and not private:
        raise BadRequest(
            "this federation has a privacy budget: its rounds need differential_privacy",
            field="differential_privacy",
        )
    if strategy in ROBUST and not private:
        # Krum and friends, the median or a trimmed mean of few updates can return one
        # client's update as it was: another organization's device would be exposed.
        raise BadRequest(
            f"{strategy} can return a single client's update; in a federation it needs "
            "differential privacy, which only the FedAvg family supports",
            field="strategy",
        )


def check_secure_round(strategy: str, *, update_format: str, private: bool) -> None:
    """A secure-aggregation round yields only the weighted sum of its updates: the FedAvg
    family combines that; robust strategies need every update on its own. With central DP the
    devices clip their own deltas before masking, so they must send deltas."""
    if strategy in ROBUST:
        raise BadRequest(
            f"{strategy} needs each update on its own; a secure_aggregation round gives only "
            "their weighted sum, so it runs the FedAvg family only",
            field="strategy",
        )
    if private and update_format != "delta":
        raise BadRequest(
            "differential_privacy on a secure_aggregation round needs update_format delta: "
            "devices clip their own deltas before masking",
            field="update_format",
        )


def check_round_device(*, selected: bool, revoked: bool, member: bool) -> None:
    """A device takes part in a round (uploads, SecAgg+ stages) only as a selected, unrevoked
    device of the round's organization or of an active member of its federation."""
    if revoked:
        raise Forbidden("this device has been revoked")
    if not selected:
        raise Forbidden("this device is not selected for the round")
    if not member:
        raise Forbidden(
            "the device's organization is not an active member of the round's federation"
        )


def check_secagg_device(
    *, secure: bool, state: str, selected: bool, revoked: bool, member: bool
) -> None:
    """A device takes part in a round's SecAgg+ session only as a round device
    (:func:`check_round_device`), in a running round that has secure_aggregation."""
    check_round_device(selected=selected, revoked=revoked, member=member)
    if not secure:
        raise PreconditionFailed("the round has no secure_aggregation", state=state)
    if state != "running":
        raise PreconditionFailed(
            f"the round is {state}; SecAgg+ stages need it running",
            state=state,
            allowed=["running"],
        )


def check_round_mix(
    federation: Federation, update_orgs: list[str], selected_orgs: list[str], *, private: bool
) -> None:
    """A federation round's result mixes at least ``min_round_updates`` updates that any one
    organization reading it did not send itself.

    Every organization of the federation reads the result and knows its own updates, so it
    can subtract them: an owner that filled a round with its own devices' zero updates would
    otherwise read the one update a member's device sent. When devices of more than one
    organization were selected, the updates of all organizations but the largest contributor
    must number ``min_round_updates`` (so at least two organizations send updates). When
    only one organization's devices take part, all its updates count. A private round's
    refusal does not say how many updates it has (the counts are not noised).
    """
    needed = federation.min_round_updates
    counts = Counter(update_orgs)
    mixed = len(update_orgs)
    if len(set(selected_orgs)) > 1 and counts:
        mixed -= max(counts.values())
    if mixed >= needed:
        return
    detail = {} if private else {"received": len(update_orgs), "mixed": mixed}
    raise PreconditionFailed(
        f"the round's result must mix at least {needed} updates that no single organization "
        "sent itself (the federation's min_round_updates); it does not yet",
        min_updates=needed,
        **detail,
    )


def round_as_seen_by(ctx: Context, rnd: Round) -> Round:
    """A round as an organization sees it: another organization's device group ids stay with
    it, so members see the selection criteria without ``device_group_id``. Selected devices
    are shown per organization as counts (``training.list_round_participation``)."""
    criteria = rnd.selection_criteria
    if rnd.org_id == ctx.org_id or not criteria or "device_group_id" not in criteria:
        return rnd
    hidden = {k: v for k, v in criteria.items() if k != "device_group_id"}
    return msgspec.structs.replace(rnd, selection_criteria=hidden)


async def device_for_reading(ctx: Context, device_id: str | None) -> str:
    """The device whose own data (personalized state, metrics) the caller reads: a device reads
    its own (``device_id`` omitted or its own id); an organization names one of its own devices
    (another organization's is ``forbidden``, checked before existence, as for every id)."""
    if ctx.principal.kind == "device":
        if device_id not in (None, ctx.principal.device_id):
            raise Forbidden("a device reads only its own data")
        return ctx.principal.device_id
    if device_id is None:
        raise BadRequest("an organization names the device it reads", field="device_id")
    # Not require_owned: the refusal does not echo the id back.
    owners = await ctx.db.all("devices.list_device_owners", Owner, device_ids=[device_id])
    if any(o.org_id != ctx.org_id for o in owners):
        raise Forbidden(
            "an organization reads only its own devices' data; other members' devices are "
            "counted per organization (training.personalized.list)"
        )
    if not owners:
        raise NotFound("no device with this id")
    return device_id


def counts_visible(dp_config: dict | None) -> bool:
    """Whether a round's device counts may be shown at all: not on a round with differential
    privacy, whose Poisson draw keeps secret who took part (the ledger's epsilon counts on it)."""
    return dp_config is None


def weight_visible(dp_config: dict | None, federation_id: str | None) -> bool:
    """Whether a live total of sample counts may be shown: not on a round whose counts are
    hidden, nor on a federation round, where an organization subtracting its own devices'
    counts from it would learn another organization's device's."""
    return counts_visible(dp_config) and federation_id is None


def counts_as_seen_by(ctx: Context, rnd: Round, counts: list[OrgParticipation]) -> list:
    """Per-organization counts of a round an organization may see. A private round's counts
    are not noised, and whether another organization's device was drawn is exactly what its
    Poisson sampling keeps secret (the ledger's epsilon counts on it): there each organization
    sees its own row only."""
    if counts_visible(rnd.dp_config):
        return counts
    return [c for c in counts if c.org_id == ctx.org_id]


def progress_as_seen_by(rnd: Round, progress: Progress) -> Progress:
    """A private round's selected and received counts and sample total are shown to nobody. A
    federation round's live sample total is not shown either: polled around one upload, it is
    that device's sample count."""
    if not counts_visible(rnd.dp_config):
        return msgspec.structs.replace(
            progress, selected_count=None, received_count=None, total_samples=None
        )
    if not weight_visible(rnd.dp_config, rnd.federation_id):
        return msgspec.structs.replace(progress, total_samples=None)
    return progress


class RoundRole(Round, kw_only=True):
    role: str  # owner | member | none


async def round_for_reading(ctx: Context, round_id: str) -> RoundRole:
    """The round, if the caller's organization runs it or is an active member of its federation."""
    found = await ctx.db.get(
        "training.find_round",
        RoundRole,
        round_id=round_id,
        org_id=ctx.org_id,
        missing="no round with this id",
    )
    if found.role == "none":
        raise Forbidden("the organization does not own this round")
    return found


async def round_for_owner(ctx: Context, round_id: str) -> RoundRole:
    """The round, if the caller's organization runs it (and so owns its model)."""
    found = await round_for_reading(ctx, round_id)
    if found.role != "owner":
        raise Forbidden("the organization does not own this round")
    return found
