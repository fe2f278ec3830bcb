"""``DeviceAgent``: the device side of fedrpc's protocol around a training callback the user writes.

The agent registers (or resumes with a stored token), syncs, takes the round
offers, downloads and checks the base weights (sha256), hands a torch module
loaded with them to the user's ``train`` callback, turns the result into the
update the offer asks for (a delta or weights; clipped to the offer's bound),
and sends it: inline or through a presigned upload by size, or, on a
SecAgg+ round, masked through the four stages of :class:`SecAggDevice`. It
reports each round as a device job when asked, reports analytics
observations and keeps personalized state. The callback owns the learning;
the agent owns the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import inspect
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fedrpc import errors
from fedrpc.client.sdk import Client
from fedrpc.client.secagg import SecAggDevice
from schemas.training import ClientConfig

__all__ = ["DeviceAgent", "LocalTask", "LocalResult", "RoundOutcome", "Abandon"]

#: The steps of one round, in order, as ``dropout`` sees them (the secure ones on SecAgg+ rounds).
STEPS = ("download", "train", "upload", "setup", "share_keys", "masked_vectors", "unmask")
#: The shortest wait between syncs, whatever the server advises (0 would be a busy loop).
MIN_POLL_SECONDS = 1.0


class Abandon(Exception):
    """Raised inside the agent when ``dropout`` says the device goes away mid-round."""


@dataclass
class LocalTask:
    """What ``train`` gets: the module loaded with the round's base weights and how to train."""

    round_id: str
    model_id: str
    base_version: int
    module: Any  # torch.nn.Module, base weights loaded
    base: dict[str, Any]  # name -> torch.Tensor, the base weights (not to be changed)
    epochs: int
    batch_size: int
    learning_rate: float
    proximal_mu: float
    offer: Any  # the RoundOffer

    def proximal_term(self, module: Any) -> Any:
        """FedProx's (mu/2)·||w - w_base||² over the trainable parameters (0 when mu is 0):
        add it to the loss."""
        if self.proximal_mu <= 0:
            return 0.0
        return (self.proximal_mu / 2) * sum(
            (p - self.base[name]).pow(2).sum() for name, p in module.named_parameters()
        )


@dataclass
class LocalResult:
    """What ``train`` returns: how many examples it used and metrics to report."""

    sample_count: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    """How one round went for this device."""

    round_id: str
    status: str  # "uploaded" | "masked" | "dropped" | "stopped" | "failed"
    sample_count: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the server's data.type, or the exception's class name
    clipped: bool = False
    sent: bool = False  # the server holds this device's update (a dropout may come after)


TrainFn = Callable[[LocalTask], LocalResult | Awaitable[LocalResult]]


class DeviceAgent:
    """One device.

    Parameters
    ----------
    url
        The server's ``/rpc`` URL.
    module_factory
        Makes the torch module of the model (its shapes must match the model's manifest);
        called once, the module is kept and each round loads its base weights into it.
    train
        ``train(task) -> LocalResult``, sync or async, trains ``task.module`` in place.
    token, token_path
        A stored device token to resume with; or a file that holds it (read if present,
        written with mode 0600 by :meth:`register`).
    report_jobs
        Record each round as a ``training.device_jobs`` job with its progress.
    dropout
        ``dropout(round_id, step) -> bool``, asked before each step of :data:`STEPS`:
        True makes the device vanish from the round there (simulations).
    poll_seconds
        How often a SecAgg+ stage that has not closed is polled again.
    require_secure_aggregation
        Refuse every round that is not SecAgg+ (the update never leaves unmasked).
    min_threshold
        The smallest SecAgg+ threshold t the device accepts.

    The server is not trusted with more than the protocol gives it: the base weights must
    match the offer's size and sha256 (the download is cut off past the size), the offer's
    training settings must be within the server's own bounds (``ClientConfig``), and any
    failure, the callback's included, ends the round as ``failed`` with its type.
    """

    def __init__(
        self,
        url: str,
        *,
        module_factory: Callable[[], Any],
        train: TrainFn,
        token: str | None = None,
        token_path: str | os.PathLike[str] | None = None,
        report_jobs: bool = True,
        dropout: Callable[[str, str], bool] | None = None,
        poll_seconds: float = 0.5,
        require_secure_aggregation: bool = False,
        min_threshold: int = 2,
        **client_options: Any,
    ) -> None:
        self.token_path = Path(token_path) if token_path is not None else None
        if token is None and self.token_path is not None and self.token_path.exists():
            token = self.token_path.read_text().strip() or None
        self.client = Client(url, token, **client_options)
        self.module_factory, self.train = module_factory, train
        self.report_jobs, self.dropout = report_jobs, dropout
        self.poll_seconds, self.min_threshold = poll_seconds, min_threshold
        self.require_secure_aggregation = require_secure_aggregation
        self.device_id: str | None = None
        self.next_poll_seconds = 60.0
        self.outcomes: dict[str, RoundOutcome] = {}
        self._module: Any = None
        self._sent = False  # of the round in progress

    async def __aenter__(self) -> DeviceAgent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.client.close()

    # -- identity ---------------------------------------------------------------------------

    async def register(self, key: str, **device: Any) -> str:
        """Register with an org admin or enrollment key (``devices.register`` params in
        ``device``); the device token, also kept in ``token_path``."""
        result = await self.client.call("devices.register", device, token=key)
        self.client.token, self.device_id = result.token, result.device_id
        if self.token_path is not None:
            self.token_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # the mode of os.open applies only to a file it creates
            with os.fdopen(fd, "w") as f:
                f.write(result.token)
        return result.token

    # -- the sync loop ----------------------------------------------------------------------

    async def sync(self, **reported: Any) -> Any:
        """One heartbeat (``devices.sync`` params in ``reported``); its result."""
        result = await self.client.devices.sync(**reported)
        self.device_id = result.device_id
        self.next_poll_seconds = max(MIN_POLL_SECONDS, result.next_poll_interval_seconds)
        return result

    async def run_once(self, **reported: Any) -> list[RoundOutcome]:
        """Sync, then take part in every offered round not yet taken; their outcomes."""
        desired = (await self.sync(**reported)).desired_state
        for stop in desired.stop_rounds:
            self.outcomes.setdefault(stop.round_id, RoundOutcome(stop.round_id, "stopped"))
        done = []
        for offer in desired.round_offers:
            if offer.round_id not in self.outcomes:
                done.append(await self.take_part(offer))
        return done

    async def run(self, *, stop: asyncio.Event | None = None, **reported: Any) -> None:
        """Sync at the server's poll interval until ``stop`` is set, taking part in offers."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            await self.run_once(**reported)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.next_poll_seconds)

    # -- one round --------------------------------------------------------------------------

    async def take_part(self, offer: Any) -> RoundOutcome:
        """Train on ``offer`` and send the update; the outcome. Never raises (but for
        cancellation): a failed round is recorded with the server's ``data.type`` or the
        exception's class name."""
        job, self._sent = None, False
        try:
            if self.report_jobs:
                job = await self.client.training.device_jobs.create(
                    job_type="federated",
                    round_id=offer.round_id,
                    model_id=offer.model_id,
                    base_version=offer.base_version,
                )
            outcome = await self._round(offer, job)
        except Abandon:
            outcome = RoundOutcome(offer.round_id, "dropped", sent=self._sent)
        except Exception as exc:  # the server's, the callback's, a hostile offer's: all recorded
            outcome = RoundOutcome(
                offer.round_id, "failed", error=failure_type(exc), sent=self._sent
            )
            if job is not None:
                with contextlib.suppress(Exception):  # best effort: the outcome is recorded
                    await self.client.training.device_jobs.update_status(
                        job_id=job.id, state="failed", last_error=outcome.error
                    )
        self.outcomes[offer.round_id] = outcome
        return outcome

    async def _step(self, offer: Any, step: str, job: Any, progress: dict | None = None) -> None:
        if self.dropout is not None and self.dropout(offer.round_id, step):
            raise Abandon(step)
        state = {"download": "downloading", "train": "training", "upload": "uploading"}.get(step)
        if job is not None and state is not None:
            await self.client.training.device_jobs.update_status(
                job_id=job.id, state=state, progress=progress
            )

    async def _round(self, offer: Any, job: Any) -> RoundOutcome:
        import safetensors.torch

        if self.require_secure_aggregation and offer.secure_aggregation is None:
            raise errors.PreconditionFailed("this device takes part in SecAgg+ rounds only")
        try:
            config = msgspec.convert(offer.client_config, ClientConfig)
        except msgspec.ValidationError:
            raise errors.BadRequest(
                "the offer's client_config is outside the server's bounds"
            ) from None
        await self._step(offer, "download", job)
        raw = await self.client.get(offer.weights_url, max_bytes=offer.weights_size_bytes)
        if len(raw) != offer.weights_size_bytes or _sha256(raw) != offer.weights_sha256:
            raise errors.BadRequest("the base weights do not match the offer's sha256")
        base = safetensors.torch.load(raw)
        if self._module is None:
            self._module = self.module_factory()
        module = self._module
        module.load_state_dict(base, strict=True)  # every parameter and buffer: none carries over
        task = LocalTask(
            round_id=offer.round_id,
            model_id=offer.model_id,
            base_version=offer.base_version,
            module=module,
            base=base,
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            proximal_mu=config.proximal_mu,
            offer=offer,
        )
        await self._step(offer, "train", job)
        result = self.train(task)
        if inspect.isawaitable(result):
            result = await result
        if int(result.sample_count) < 1:
            raise ValueError("train reported no examples: there is no update to send")
        samples = min(int(result.sample_count), offer.max_sample_count)
        delta = _delta(base, module.state_dict())
        bound = _norm_bound(offer)
        clipped = _clip(delta, bound)
        if offer.secure_aggregation is not None:
            await self._secure(offer, delta, samples)
            status = "masked"
        else:
            await self._step(offer, "upload", job, {"loss": result.metrics.get("loss", 0.0)})
            await self._upload(offer, base, delta, samples, result.metrics, bound)
            status = "uploaded"
        if job is not None:
            await self.client.training.device_jobs.complete(job_id=job.id, metrics=result.metrics)
        return RoundOutcome(
            offer.round_id, status, samples, dict(result.metrics), clipped=clipped, sent=True
        )

    async def _upload(self, offer, base, delta, samples: int, metrics: Mapping, bound) -> None:
        import safetensors.numpy

        body = _weights(base, delta, bound) if offer.update_format == "weights" else delta
        data = safetensors.numpy.save(body)
        await self.client.training.weights.upload(
            round_id=offer.round_id,
            model_id=offer.model_id,
            version=offer.base_version,
            sample_count=samples,
            update_format=offer.update_format,
            weights=await self.client.payload("weights", data),
            metrics=dict(metrics),
        )
        self._sent = True

    async def _secure(self, offer: Any, delta: dict[str, np.ndarray], samples: int) -> None:
        device = SecAggDevice(delta, samples, min_threshold=self.min_threshold)
        rid = offer.round_id
        await self._stage(offer, "setup", lambda: device.setup_params(rid), device.read_setup)
        await self._stage(offer, "share_keys", device.share_keys_params, device.read_share_keys)
        vector = device.masked_vector_bytes()
        upload_id = None
        if len(vector) > self.client.inline_max_bytes:
            upload_id = (await self.client.payload("secagg_vector", vector))["upload_id"]
        await self._stage(
            offer,
            "masked_vectors",
            lambda: device.masked_vectors_params(upload_id),
            device.read_masked_vectors,
        )
        self._sent = True
        await self._step(offer, "unmask", None)
        await self.client.call("training.secagg.unmask", device.unmask_params())

    async def _stage(self, offer, step: str, params: Callable, read: Callable) -> None:
        """Call a stage until the server says it closed (a poll replays the same params), at
        most until the round's deadline."""
        await self._step(offer, step, None)
        method = f"training.secagg.{step}"
        # Polling is the protocol here: the server only answers, it never calls a device.
        while not read(_plain(await self.client.call(method, params()))):  # noqa: ASYNC110
            if dt.datetime.now(dt.UTC) >= offer.deadline:
                raise errors.PreconditionFailed(f"{step} did not close before the round's deadline")
            await asyncio.sleep(self.poll_seconds)

    # -- analytics and personalized state ---------------------------------------------------

    async def report(self, observations: Iterable[Mapping[str, Any]]) -> int:
        """``analytics.report`` of the observations (dicts of variable, value or category,
        recorded_at); how many the server accepted."""
        return (await self.client.analytics.report(observations=list(observations))).accepted

    async def save_personalized(
        self,
        model_id: str,
        state: Mapping[str, Any] | None,
        *,
        personalization_type: str = "local_finetune",
        federation_id: str | None = None,
        metrics: Mapping[str, float] | None = None,
        head_layers: Iterable[str] = (),
        round_number: int | None = None,
    ) -> Any:
        """Store this device's personalized weights (name -> tensor or array) for a model."""
        import safetensors.numpy

        params: dict[str, Any] = {
            "model_id": model_id,
            "personalization_type": personalization_type,
            "metrics": dict(metrics or {}),
            "head_layers": list(head_layers),
        }
        if federation_id is not None:
            params["federation_id"] = federation_id
        if round_number is not None:
            params["round_number"] = round_number
        if state is not None:
            arrays = {k: _numpy(v) for k, v in state.items()}
            data = safetensors.numpy.save(arrays)
            params["weights"] = await self.client.payload("personalization", data)
        return await self.client.training.personalized.update(**params)

    async def load_personalized(
        self, model_id: str, *, federation_id: str | None = None
    ) -> dict[str, np.ndarray] | None:
        """This device's personalized weights for a model, or None when it has none stored."""
        import safetensors.numpy

        params = {"model_id": model_id}
        if federation_id is not None:
            params["federation_id"] = federation_id
        found = await self.client.training.personalized.get(**params)
        if found.state is None or found.weights_url is None:
            return None
        raw = await self.client.get(found.weights_url, max_bytes=found.state.weights_size_bytes)
        if _sha256(raw) != found.state.weights_sha256:
            raise errors.BadRequest("the personalized weights do not match their sha256")
        return safetensors.numpy.load(raw)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def _delta(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """new - base per floating tensor; integer buffers (BatchNorm's counter) as zeros, which
    aggregation ignores (docs/model-artifacts.md)."""
    out = {}
    for name, before in base.items():
        after = _numpy(new[name])
        if np.issubdtype(after.dtype, np.floating):
            out[name] = after - _numpy(before)
        else:
            out[name] = np.zeros_like(after)
    return out


def _norm_bound(offer: Any) -> float | None:
    """The L2 bound the device clips its delta to: the offer's max_update_norm (larger is
    refused) and a DP round's clipping norm (the server would clip to it anyway)."""
    bounds = [offer.max_update_norm]
    if offer.differential_privacy and offer.secure_aggregation is None:
        bounds.append(offer.differential_privacy.get("clipping_norm"))
    bounds = [float(b) for b in bounds if b]
    return min(bounds) if bounds else None


def _clip(delta: dict[str, np.ndarray], bound: float | None) -> bool:
    """Scale the floating tensors in place so their joint L2 norm is at most ``bound``
    (a hair under it, so float32 rounding cannot push it over); True if it scaled."""
    if bound is None:
        return False
    floats = [v for v in delta.values() if np.issubdtype(v.dtype, np.floating)]
    norm = float(np.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in floats)))
    if norm <= bound * (1 - 1e-5):
        return False
    scale = bound * (1 - 1e-5) / norm
    for v in floats:
        v *= scale
    return True


def _weights(base: Mapping[str, Any], delta: dict[str, np.ndarray], bound: float | None):
    """base + delta in the tensors' own dtype, for update_format "weights". Rounding to
    float32 can move each value by half a step, which may take a clipped delta back over the
    bound: then the delta shrinks again (at last to zero, which is always within it)."""
    for _ in range(8):
        body = {k: (_numpy(base[k]) + v).astype(v.dtype) for k, v in delta.items()}
        if bound is None:
            return body
        sent = float(
            np.sqrt(sum(np.sum((body[k] - _numpy(base[k]).astype(np.float64)) ** 2) for k in body))
        )
        if sent <= bound:
            return body
        for v in delta.values():
            if np.issubdtype(v.dtype, np.floating):
                v *= 0.5 * bound / sent
    return {k: _numpy(base[k]).copy() for k in delta}


def _plain(result: Any) -> Any:
    """A Result Struct as the dicts the SecAgg+ device reads."""
    return msgspec.to_builtins(result)


def failure_type(exc: BaseException) -> str:
    """What a failed round records: the server's ``data.type``, else the exception's class."""
    return getattr(exc, "type", None) or type(exc).__name__
