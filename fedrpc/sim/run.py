"""One federated-learning simulation against a fedrpc server: N device agents, R rounds.

``simulate(config, url, token)`` sets up what the run needs with the org key
(a model and its base version from the task's network, the devices, and a
federation with a privacy budget when DP is on), then drives each round as
an operator would: ``training.create_round`` -> ``select_devices`` ->
``start_round`` -> the selected devices' agents sync and take part (bounded
concurrency, in this process) -> ``training.aggregate``. The new version is
then evaluated through its published ONNX artifact with onnxruntime, on the
held-out split. Client failures are counted by their ``data.type``, never
dropped silently; a round that cannot be aggregated is recorded with the
reason and the next round starts from the same version.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from fedrpc import errors
from fedrpc.client import Client, DeviceAgent, LocalResult, LocalTask, RoundOutcome
from fedrpc.client.agent import failure_type
from fedrpc.sim import digits

__all__ = ["SimConfig", "RoundReport", "SimReport", "simulate", "SECURE_STEPS"]

#: Where a device of a SecAgg+ round may vanish (one of them, drawn per dropout).
SECURE_STEPS = ("setup", "share_keys", "masked_vectors", "unmask")
DEVICE = {"platform": "linux", "os_version": "sim", "model": "fedrpc-sim", "app_version": "1.0"}


@dataclass(frozen=True)
class SimConfig:
    devices: int = 20
    rounds: int = 5
    partition: str = "iid"
    strategy: str = "fedavg"
    strategy_params: dict[str, float] = field(default_factory=dict)
    secure_aggregation: bool = False
    dp_noise: float | None = None  # with dp_clip: central DP on a federation round
    dp_clip: float | None = None
    epsilon_budget: float = 1000.0
    dropout: float = 0.0  # share of the selected devices that vanish each round
    fraction: float = 1.0  # share of the devices a round targets
    steps: digits.LocalSteps = field(default_factory=digits.LocalSteps)
    # Devices at work at once on plain rounds (measured at 1,000 devices: 16 and 32 gave
    # 3.6-4.1 s per round, 64 about 5 s: more only queues at the server).
    concurrency: int = 16
    report_jobs: bool = False
    # SecAgg+ stage deadline, what a dropout costs a secure round; None: max(30, devices / 10)
    # s, as a stage of 1,000 devices on one core took more than 30 s.
    stage_seconds: int | None = None
    seed: int = 0

    @property
    def dp(self) -> bool:
        return self.dp_noise is not None

    @property
    def stage_deadline(self) -> int:
        return self.stage_seconds or max(30, self.devices // 10)


@dataclass
class RoundReport:
    number: int
    round_id: str
    version: int | None  # None when the round produced no version
    selected: int
    participants: int  # devices whose update (or masked vector) the server holds
    dropouts: int
    failures: dict[str, int]  # client failures by data.type
    accuracy: float | None
    loss: float | None
    epsilon: float | None
    seconds: float
    error: str | None = None  # why the round produced no version


@dataclass
class SimReport:
    config: SimConfig
    model_id: str
    federation_id: str | None
    base_accuracy: float
    centralized_accuracy: float  # the same network trained on all the training data at once
    rounds: list[RoundReport]
    setup_seconds: float
    seconds: float

    @property
    def final_accuracy(self) -> float | None:
        done = [r.accuracy for r in self.rounds if r.accuracy is not None]
        return done[-1] if done else None


class _Fleet:
    """The simulated devices: one agent each over a shared HTTP session, and their data."""

    def __init__(self, config: SimConfig, url: str, http: aiohttp.ClientSession) -> None:
        self.config, self.url, self.http = config, url, http
        self.split = digits.load_split()  # one held-out set for every seed
        self.parts = digits.partition(
            self.split.y_train, config.devices, config.partition, config.seed
        )
        self.agents: dict[str, DeviceAgent] = {}
        self.leaving: dict[str, str] = {}  # device id -> the step it vanishes at this round
        self.round_number = 0

    def _agent(self, index: int) -> DeviceAgent:
        def train(task: LocalTask) -> LocalResult:
            idx = self.parts[index]
            loss = digits.local_train(
                task.module,
                self.split.x_train[idx],
                self.split.y_train[idx],
                digits.LocalSteps(
                    task.epochs, task.batch_size, task.learning_rate, task.proximal_mu
                ),
                seed=self.round_number * 100_003 + index,
                proximal_to=task.base,
            )
            return LocalResult(len(idx), {"loss": loss})

        return DeviceAgent(
            self.url,
            module_factory=digits.make_net,
            train=train,
            report_jobs=self.config.report_jobs,
            # A waiting SecAgg+ stage is polled by every device: about 1,000 polls a second in
            # all, whatever the population, leaves the server to the calls that move it on.
            poll_seconds=max(0.05, self.config.devices / 1000),
            session=self.http,
            retries=8,
        )

    async def register(self, key: str) -> None:
        async def one(index: int) -> None:
            agent = self._agent(index)
            await agent.register(key, **DEVICE)
            self.agents[agent.device_id] = agent

        await _bounded(
            [lambda i=i: one(i) for i in range(self.config.devices)], self.config.concurrency
        )


async def _bounded(jobs: list[Callable[[], Any]], width: int) -> list[Any]:
    gate = asyncio.Semaphore(width)

    async def run(job):
        async with gate:
            return await job()

    return await asyncio.gather(*(run(j) for j in jobs))


async def simulate(
    config: SimConfig,
    url: str,
    token: str,
    *,
    on_round_start: Callable[[int, int], None] | None = None,
    on_device_done: Callable[[], None] | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
) -> SimReport:
    """Run the simulation; the callbacks feed a progress display (round number and device
    count at the start of a round, one call per device that finished, the round's report)."""
    started = time.perf_counter()
    rng = random.Random(config.seed)
    async with aiohttp.ClientSession() as http, Client(url, token, session=http) as admin:
        fleet = _Fleet(config, url, http)
        model = await admin.models.create(name=f"digits-sim-{rng.getrandbits(32):08x}")
        version = await admin.models.versions.create_from_module(
            model_id=model.id,
            module=digits.make_net(config.seed),
            example_input=_example(),
            description="fedrpc simulate: the untrained base network",
        )
        federation_id = await _federation(admin, config, model.id) if config.dp else None
        centralized = asyncio.create_task(
            asyncio.to_thread(digits.centralized_baseline, fleet.split, seed=config.seed)
        )
        await fleet.register(token)
        evaluator = _Evaluator(admin, fleet.split)
        base_accuracy, _ = await evaluator.score(model.id, version.version)
        setup_seconds = time.perf_counter() - started
        reports, current = [], version.version
        for number in range(1, config.rounds + 1):
            report = await _one_round(
                admin, fleet, config, rng, model.id, current, federation_id, number,
                evaluator, on_round_start, on_device_done,
            )  # fmt: skip
            current = report.version or current
            reports.append(report)
            if on_round is not None:
                on_round(report)
        for agent in fleet.agents.values():
            await agent.close()
        centralized_accuracy = await centralized
    return SimReport(
        config, model.id, federation_id, base_accuracy, centralized_accuracy, reports,
        setup_seconds, time.perf_counter() - started,
    )  # fmt: skip


def _example():
    import torch

    return torch.zeros((2, digits.FEATURES))


async def _federation(admin: Client, config: SimConfig, model_id: str) -> str:
    me = await admin.orgs.get()
    fed = await admin.federations.create(
        name="digits-sim",
        org_id=me.id,
        min_round_updates=2,
        privacy_policy={"total_epsilon_budget": config.epsilon_budget},
    )
    await admin.federations.models.share(federation_id=fed.id, model_id=model_id)
    return fed.id


def _round_params(config: SimConfig, model_id: str, base: int, federation_id: str | None):
    steps = config.steps
    params: dict[str, Any] = {
        "model_id": model_id,
        "base_version": base,
        "target_device_count": max(1, round(config.devices * config.fraction)),
        "min_updates": 2 if config.dp else 1,
        "update_format": "delta",
        "strategy": {"name": config.strategy, "params": config.strategy_params},
        "client_config": {
            "epochs": steps.epochs,
            "batch_size": steps.batch_size,
            "learning_rate": steps.learning_rate,
            "proximal_mu": steps.proximal_mu,
        },
        "deadline_seconds": 3600,
        "max_sample_count": 100_000,
    }
    if federation_id is not None:
        params["federation_id"] = federation_id
        params["differential_privacy"] = {
            "noise_multiplier": config.dp_noise,
            "clipping_norm": config.dp_clip,
        }
    if config.secure_aggregation:
        params["secure_aggregation"] = {"stage_seconds": config.stage_deadline}
    return params


async def _one_round(
    admin, fleet, config, rng, model_id, base, federation_id, number, evaluator,
    on_round_start, on_device_done,
) -> RoundReport:  # fmt: skip
    started = time.perf_counter()
    fleet.round_number = number
    rnd = await admin.training.create_round(**_round_params(config, model_id, base, federation_id))
    selected = (await admin.training.select_devices(round_id=rnd.id)).selected
    await admin.training.start_round(round_id=rnd.id)
    leaving = set(rng.sample(selected, round(len(selected) * config.dropout)))
    steps = SECURE_STEPS if config.secure_aggregation else ("upload",)
    fleet.leaving = {d: rng.choice(steps) for d in leaving}
    if on_round_start is not None:
        on_round_start(number, len(selected))

    async def device(device_id: str) -> RoundOutcome | None:
        agent = fleet.agents[device_id]
        agent.dropout = lambda rid, step: rid == rnd.id and fleet.leaving.get(device_id) == step
        try:
            outcomes = await agent.run_once()
        except Exception as exc:  # its sync failed (after the SDK's retries): counted below
            outcomes = [RoundOutcome(rnd.id, "failed", error=failure_type(exc))]
        finally:
            if on_device_done is not None:
                on_device_done()
        mine = [o for o in outcomes if o.round_id == rnd.id]
        return mine[0] if mine else None

    # A SecAgg+ stage closes when every live device has called it: all of them must be at
    # work at once (as real devices are), or the first ones would poll a stage the others
    # cannot reach until its deadline.
    width = len(selected) if config.secure_aggregation else config.concurrency
    outcomes = await _bounded([lambda d=d: device(d) for d in selected], width)
    statuses = Counter(o.status if o else "no_offer" for o in outcomes)
    failures = Counter(o.error for o in outcomes if o is not None and o.status == "failed")
    if statuses["no_offer"]:
        failures["no_offer"] += statuses["no_offer"]
    version, error, accuracy, loss = None, None, None, None
    try:
        if config.secure_aggregation:
            # Each of the four stages may wait for its deadline when devices vanish.
            await asyncio.wait_for(
                _secure_session_end(admin, rnd.id), 4 * config.stage_deadline + 60
            )
        new = await admin.training.aggregate(round_id=rnd.id)
        version = new.version
        accuracy, loss = await evaluator.score(model_id, version)
    except errors.AppError as exc:
        error = f"{exc.type}: {exc.message}"
    except TimeoutError:
        error = "the SecAgg+ session did not end within its stages' deadlines"
    epsilon = None
    if federation_id is not None:
        epsilon = (
            await admin.federations.privacy.get(federation_id=federation_id)
        ).current_epsilon_spent
    return RoundReport(
        number, rnd.id, version, len(selected),
        sum(1 for o in outcomes if o is not None and o.sent), statuses["dropped"], dict(failures),
        accuracy, loss, epsilon, time.perf_counter() - started, error,
    )  # fmt: skip


async def _secure_session_end(admin: Client, round_id: str) -> None:
    """Wait until the round's SecAgg+ session completed or failed (a stage whose devices
    vanished closes at its deadline)."""
    while True:
        status = await admin.training.secagg.status(round_id=round_id)
        if status.stage in ("completed", "failed"):
            return
        await asyncio.sleep(0.1)


class _Evaluator:
    """Held-out accuracy and loss of a version, computed by onnxruntime on its ONNX artifact:
    what the server published is what is measured."""

    def __init__(self, admin: Client, split: digits.Split) -> None:
        self.admin, self.split = admin, split

    async def score(self, model_id: str, version: int) -> tuple[float, float]:
        import hashlib

        links = await self.admin.models.versions.download(
            model_id=model_id, version=version, kinds=["onnx"]
        )
        (link,) = links.artifacts
        onnx = await self.admin.get(link.url)
        if hashlib.sha256(onnx).hexdigest() != link.sha256:
            raise errors.BadRequest("the ONNX artifact does not match its sha256")
        return await asyncio.to_thread(self._run, onnx)

    def _run(self, onnx: bytes) -> tuple[float, float]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        (logits,) = session.run(None, {name: self.split.x_test})
        return digits.evaluate(np.asarray(logits), self.split.y_test)
