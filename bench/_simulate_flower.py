"""Flower's own simulation engine on the shared digits task: the peer of ``fedrpc simulate``.

``bench/simulate.py`` runs this module in a subprocess (so Ray's daemons and
threads never share a process with the other contenders) and reads the one
JSON line it prints. It measures what a Flower user gets from
``flwr.simulation.run_simulation`` (the Message-API ``ServerApp``/``ClientApp``
pair on Flower's Ray backend) for the task every contender shares,
``fedrpc.sim.digits``: FedAvg over every device every round, each device
running ``local_train`` on its IID partition, the server weighting replies by
sample count and evaluating the global weights on the held-out split after
each round. Nothing here is tuned beyond Flower's public knobs: the per-round
times are Flower's scheduling, serialization and Ray dispatch plus the
training itself, which is the same work the other contenders do.

Ray runs locally (``address="local"``) on the machine's cores with one CPU per
ClientApp (Flower's default is two, which on a two-core machine would leave a
single actor training one device at a time). Flower's telemetry and Ray's
usage statistics are switched off, so nothing leaves loopback.
"""

from __future__ import annotations

import os

# Both are read when flwr and ray are imported, so they are set first; Ray's
# worker processes inherit them.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from fedrpc.sim.digits import (  # noqa: E402
    LocalSteps,
    evaluate,
    load_split,
    local_train,
    make_net,
    partition,
)

__all__ = ["run_flower", "STEPS"]

# The local steps every contender runs, spelled out rather than left to the
# dataclass defaults so a change there cannot silently change this peer.
STEPS = LocalSteps(epochs=5, batch_size=8, learning_rate=0.2)

# Each Ray actor is a long-lived process that runs many ClientApp calls; the
# split and its partition are computed once per actor and kept here, as
# Flower's own examples cache their datasets in a module global. This only
# works because the ClientApp below is pickled by reference (see __main__).
_PARTS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = {}


def _device_data(devices: int, seed: int, device: int) -> tuple[np.ndarray, np.ndarray]:
    if (devices, seed) not in _PARTS:
        split = load_split(seed)
        _PARTS[devices, seed] = (
            split.x_train,
            split.y_train,
            partition(split.y_train, devices, "iid", seed),
        )
    x, y, parts = _PARTS[devices, seed]
    return x[parts[device]], y[parts[device]]


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    """One device's round: load the global weights, run the local steps, send them back."""
    device = int(context.node_config["partition-id"])
    devices = int(context.node_config["num-partitions"])
    config = msg.content["config"]
    server_round, seed = int(config["server-round"]), int(config["data-seed"])
    x, y = _device_data(devices, seed, device)
    net = make_net(seed)  # only its shape matters: the global weights replace its own
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = local_train(net, x, y, STEPS, seed=server_round * 100_000 + device)
    reply = RecordDict(
        {
            "arrays": ArrayRecord(net.state_dict()),
            # FedAvg weights each reply by this key (its weighted_by_key default).
            "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss}),
        }
    )
    return Message(content=reply, reply_to=msg)


class _AllDevicesFedAvg(FedAvg):
    """FedAvg that refuses a round in which any device failed.

    Stock FedAvg aggregates whatever replies arrive and only logs failures; a
    benchmark that lost devices would then look faster than it is.
    """

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed or len(replies) != self.min_train_nodes:
            reason = failed[0].error.reason if failed else "missing replies"
            raise RuntimeError(
                f"round {server_round}: {len(replies) - len(failed)} of "
                f"{self.min_train_nodes} devices replied ({reason})"
            )
        return super().aggregate_train(server_round, replies)


def _server_app(devices: int, rounds: int, seed: int, out: dict[str, Any]) -> ServerApp:
    """The ServerApp; it runs in a thread of this process, so it reports through ``out``."""
    split = load_split(seed)
    x_test = torch.from_numpy(split.x_test)
    net = make_net(seed)
    app = ServerApp()

    def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            accuracy, loss = evaluate(net(x_test).numpy(), split.y_test)
        # Flower calls this once before round 1 and once at the end of every
        # round, so the gaps between the calls are the rounds as the server sees them.
        out["round_ends"].append(time.perf_counter())
        # Flower shuts Ray down inside run_simulation, so Ray's CPU is read
        # here, while its processes are alive: after round 1 (start-up done)
        # and after the last round (a scan of a dozen processes, milliseconds).
        if server_round in (1, rounds):
            out["cpu"][server_round] = (_rusage_seconds(resource.RUSAGE_SELF), _ray_cpu_seconds())
        if server_round > 0:
            out["accuracy"].append(accuracy)
            out["loss"].append(loss)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    @app.main()
    def run_rounds(grid: Grid, context: Context) -> None:
        strategy = _AllDevicesFedAvg(
            fraction_train=1.0,
            min_train_nodes=devices,
            min_available_nodes=devices,
            fraction_evaluate=0.0,  # no client-side evaluation: the server evaluates
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(make_net(seed).state_dict()),
            num_rounds=rounds,
            train_config=ConfigRecord({"data-seed": seed}),
            evaluate_fn=central_evaluation,
        )

    return app


def _ray_cpu_seconds() -> float:
    """User+system CPU so far of every descendant of this process: Ray's daemons and workers."""
    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            times = proc.cpu_times()
        except psutil.Error:  # a worker that exited in between
            continue
        # Workers that Ray already retired and reaped count in their parent's children_*.
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _rusage_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_flower(devices: int, rounds: int, seed: int = 0, client_cpus: float = 1) -> dict:
    """Run Flower's simulation of ``rounds`` FedAvg rounds over ``devices`` devices.

    ``client_cpus`` is the Ray CPU share of one ClientApp; with 1 there are as
    many actors training at once as the machine has cores.
    """
    # Needs Flower's simulation extra (Ray); imported here so the module loads without it.
    from flwr.simulation import run_simulation

    out: dict[str, Any] = {"round_ends": [], "accuracy": [], "loss": [], "cpu": {}}
    server_app = _server_app(devices, rounds, seed, out)
    cores = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        # A fresh local Ray instance on this machine's cores, never a cluster
        # named by RAY_ADDRESS; its workers' logs are not echoed here.
        "init_args": {
            "address": "local",
            "num_cpus": cores,
            "logging_level": "ERROR",
            "log_to_driver": False,
        },
    }
    self_before = _rusage_seconds(resource.RUSAGE_SELF)
    children_before = _rusage_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=devices,
        backend_config=backend_config,
    )
    finished = time.perf_counter()
    # Flower's RayBackend has called ray.shutdown() by now; what the daemons
    # reaped before exiting is all RUSAGE_CHILDREN can still see.
    rusage_cpu = (
        _rusage_seconds(resource.RUSAGE_SELF)
        - self_before
        + _rusage_seconds(resource.RUSAGE_CHILDREN)
        - children_before
    )

    ends = out["round_ends"]
    if len(ends) != rounds + 1:
        raise RuntimeError(f"Flower finished {len(ends) - 1} of {rounds} rounds")
    round_seconds = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    # Flower starts the ServerApp before Ray and its actors are up, so round 1
    # also carries that start-up; the steady rate leaves it out.
    steady = round_seconds[1:] or round_seconds
    (self_first, ray_first), (self_last, ray_last) = out["cpu"][1], out["cpu"][rounds]
    self_cpu, ray_cpu = self_last - self_before, ray_last
    steady_cpu = (
        (self_last - self_first + ray_last - ray_first) / (rounds - 1) if rounds > 1 else None
    )
    return {
        "framework": "flwr",
        "flwr_version": _version("flwr"),
        "ray_version": _version("ray"),
        "devices": devices,
        "rounds": rounds,
        "seed": seed,
        "client_cpus": client_cpus,
        "ray_cpus": cores,
        "epochs": STEPS.epochs,
        "batch_size": STEPS.batch_size,
        "learning_rate": STEPS.learning_rate,
        "round_seconds": round_seconds,
        "seconds_per_round": statistics.mean(steady),
        "median_seconds_per_round": statistics.median(steady),
        "first_round_seconds": round_seconds[0],
        "total_seconds": finished - started,  # run_simulation, start-up to return
        "accuracy": out["accuracy"],
        "loss": out["loss"],
        "final_accuracy": out["accuracy"][-1],
        "final_loss": out["loss"][-1],
        # CPU from the start of run_simulation to the end of the last round:
        # this process (ServerApp thread, Flower's simulation threads) and Ray's.
        "cpu_seconds": self_cpu + ray_cpu,
        "cpu_seconds_self": self_cpu,
        "cpu_seconds_ray": ray_cpu,
        "cpu_seconds_per_round": steady_cpu,  # both, rounds 2 to the last
        # getrusage self+children over the whole run_simulation call, teardown
        # included: a lower bound, since a child counts only once reaped and
        # Ray's workers are grandchildren that the raylet may not have reaped.
        "cpu_seconds_rusage": rusage_cpu,
    }


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _quiet() -> None:
    """Keep stdout for the JSON line and stderr for real errors."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("ray").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-cpus", type=float, default=1)
    args = parser.parse_args(argv)
    _quiet()
    result = run_flower(args.devices, args.rounds, args.seed, client_cpus=args.client_cpus)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    # Run through the module imported by name, not through __main__: Ray
    # pickles __main__'s functions by value, which would ship a fresh, empty
    # _PARTS with every ClientApp call; by name each actor imports this module
    # once (Flower puts this script's directory on the workers' PYTHONPATH).
    import _simulate_flower

    _simulate_flower.main()
