"""``fedrpc simulate``: the command line around :func:`fedrpc.sim.run.simulate`.

Against a running server (``--url``, the org admin key in ``FEDRPC_TOKEN``),
or, without ``--url``, against a server of its own: a throwaway embedded
PostgreSQL and S3 under a scratch directory, an organization created in that
database, and ``fedrpc serve`` in a child process on a free loopback port
(so the server and the simulated devices use separate cores). Shows a
progress bar per round and a final table (rich), writes a PNG of accuracy
and epsilon per round with ``--plot`` (matplotlib) and the whole report as
JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from fedrpc.cli import CliError
from fedrpc.errors import AppError
from schemas.training import StrategyName

if TYPE_CHECKING:  # torch comes with these: imported when the command runs, not by `fedrpc`
    from fedrpc.sim.run import SimConfig, SimReport

TOKEN_ENV = "FEDRPC_TOKEN"  # as `fedrpc call`


class SimulateError(CliError):
    """The simulation cannot start; the message is printed as it is."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("simulate", help="federated training of simulated devices")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--dataset", choices=["digits"], default="digits")
    p.add_argument("--partition", default="iid", help="iid or dirichlet:ALPHA")
    p.add_argument("--strategy", default="fedavg", choices=get_args(StrategyName))
    p.add_argument("--secure-aggregation", action="store_true")
    p.add_argument("--dp", help="noise=Z,clip=C[,budget=EPSILON]: central DP in a federation")
    p.add_argument("--dropout", type=float, default=0.0, help="share of devices lost per round")
    p.add_argument("--fraction", type=float, default=1.0, help="share of devices per round")
    p.add_argument("--epochs", type=int, help="local epochs (default 5)")
    p.add_argument("--batch-size", type=int, help="local batch size (default 8)")
    p.add_argument("--learning-rate", type=float, help="local SGD step size (default 0.2)")
    p.add_argument("--mu", type=float, help="FedProx's proximal mu (fedprox: 0.01 if not given)")
    p.add_argument("--concurrency", type=int, default=16, help="devices working at once")
    p.add_argument(
        "--stage-seconds", type=int, help="SecAgg+ stage deadline (default max(30, devices/10))"
    )
    p.add_argument("--jobs", action="store_true", help="devices report training.device_jobs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help=f"a running server's /rpc URL (org admin key in ${TOKEN_ENV})")
    p.add_argument("--plot", type=Path, help="write a PNG of accuracy and epsilon per round")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=main)


def config_from(args: argparse.Namespace) -> SimConfig:
    """The SimConfig of the flags, or SimulateError naming the bad one."""
    from fedrpc.sim import digits
    from fedrpc.sim.run import SimConfig

    if args.devices < 2 or args.rounds < 1:
        raise SimulateError("fedrpc simulate: --devices must be >= 2 and --rounds >= 1")
    if not 0 <= args.dropout < 1 or not 0 < args.fraction <= 1:
        raise SimulateError("fedrpc simulate: --dropout must be in [0, 1), --fraction in (0, 1]")
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--learning-rate", args.learning_rate), ("--concurrency", args.concurrency),
                        ("--stage-seconds", args.stage_seconds)):  # fmt: skip
        if value is not None and not value > 0:
            raise SimulateError(f"fedrpc simulate: {flag} must be positive")
    try:
        digits.partition(digits.load_split().y_train[:20], 2, args.partition)
    except ValueError as exc:
        raise SimulateError(f"fedrpc simulate: --partition {args.partition}: {exc}") from None
    mu = args.mu if args.mu is not None else (0.01 if args.strategy == "fedprox" else 0.0)
    config = SimConfig(
        devices=args.devices,
        rounds=args.rounds,
        partition=args.partition,
        strategy=args.strategy,
        secure_aggregation=args.secure_aggregation,
        dropout=args.dropout,
        fraction=args.fraction,
        steps=digits.LocalSteps(
            digits.LocalSteps.epochs if args.epochs is None else args.epochs,
            digits.LocalSteps.batch_size if args.batch_size is None else args.batch_size,
            digits.LocalSteps.learning_rate if args.learning_rate is None else args.learning_rate,
            mu,
        ),
        concurrency=args.concurrency,
        report_jobs=args.jobs,
        stage_seconds=args.stage_seconds,
        seed=args.seed,
    )
    if args.dp:
        config = replace(config, **_dp(args.dp))
    return config


def _dp(text: str) -> dict[str, float]:
    names = {"noise": "dp_noise", "clip": "dp_clip", "budget": "epsilon_budget"}
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        try:
            out[names[key.strip()]] = float(value)
        except (KeyError, ValueError):
            raise SimulateError(
                f"fedrpc simulate: --dp {text!r}: expected noise=Z,clip=C[,budget=EPSILON]"
            ) from None
    if "dp_noise" not in out or "dp_clip" not in out:
        raise SimulateError("fedrpc simulate: --dp needs both noise= and clip=")
    return out


def one_torch_thread() -> None:
    """The devices' tiny steps gain nothing from a second torch thread; on a machine the
    server shares, it would only take the core the server needs (a round at 1,000 devices
    took 14-21 s with torch's default threads, 6.5-7 s with one)."""
    import torch

    torch.set_num_threads(1)


def main(args: argparse.Namespace) -> int:
    config = config_from(args)
    one_torch_thread()
    with contextlib.ExitStack() as stack:
        if args.url:
            token = os.environ.get(TOKEN_ENV)
            if not token:
                raise SimulateError(
                    f"fedrpc simulate: --url needs the org admin key in ${TOKEN_ENV}"
                )
            url = args.url
        else:
            server = stack.enter_context(own_server())
            url, token = server.url, server.token
        try:
            report = asyncio.run(_run(config, url, token, quiet=args.quiet))
        except AppError as exc:  # the server refused the run's set-up (a --dp value, the key)
            raise SimulateError(
                f"fedrpc simulate: the server said {exc.type}: {exc.message}"
            ) from None
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report_json(report), indent=2))
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}")
    return 0 if report.final_accuracy is not None else 1


async def _run(config: SimConfig, url: str, token: str, *, quiet: bool) -> SimReport:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedrpc.sim.run import simulate

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=quiet, transient=False) as progress:
        current: dict[str, int] = {}

        def start(number: int, devices: int) -> None:
            current["task"] = progress.add_task(f"round {number}/{config.rounds}", total=devices)

        def step() -> None:
            progress.advance(current["task"])

        def done(r) -> None:
            acc = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
            eps = "" if r.epsilon is None else f" epsilon {r.epsilon:.3f}"
            note = f" ({r.error})" if r.error else ""
            progress.update(
                current["task"],
                description=f"round {r.number}/{config.rounds} accuracy {acc}{eps}{note}",
            )

        return await simulate(
            config, url, token, on_round_start=start, on_device_done=step, on_round=done
        )


def print_table(report: SimReport) -> None:
    from rich.console import Console
    from rich.table import Table

    c = report.config
    title = (
        f"{c.devices} devices, {c.partition}, {c.strategy}"
        + (", SecAgg+" if c.secure_aggregation else "")
        + (f", DP noise {c.dp_noise} clip {c.dp_clip}" if c.dp else "")
        + (f", dropout {c.dropout}" if c.dropout else "")
    )
    table = Table(title=title)
    for name in ("round", "version", "selected", "participants", "dropouts", "client failures",
                 "accuracy", "loss", "epsilon", "seconds"):  # fmt: skip
        table.add_column(name, justify="right")
    for r in report.rounds:
        failures = ", ".join(f"{k} {v}" for k, v in sorted(r.failures.items())) or "0"
        table.add_row(
            str(r.number),
            str(r.version) if r.version is not None else f"none: {r.error}",
            str(r.selected),
            str(r.participants),
            str(r.dropouts),
            failures,
            _num(r.accuracy),
            _num(r.loss),
            _num(r.epsilon),
            f"{r.seconds:.2f}",
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print(
        f"base accuracy {report.base_accuracy:.3f} -> final {_num(report.final_accuracy)} "
        f"(centralized training of the same network: {report.centralized_accuracy:.4f}); "
        f"set-up {report.setup_seconds:.1f} s, total {report.seconds:.1f} s"
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def report_json(report: SimReport) -> dict:
    out = asdict(report)
    out["final_accuracy"] = report.final_accuracy
    return out


def plot(report: SimReport, path: Path) -> None:
    """Accuracy per round (left axis) and epsilon spent (right axis, DP runs) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [r.number for r in report.rounds]
    accuracy = [report.base_accuracy] + [r.accuracy for r in report.rounds]
    fig, left = plt.subplots(figsize=(7, 4), dpi=100)
    left.plot(rounds, [float("nan") if a is None else a for a in accuracy], "o-", label="accuracy")
    left.set_xlabel("round")
    left.set_ylabel("held-out accuracy (ONNX artifact)")
    left.axhline(
        report.centralized_accuracy, color="grey", linestyle=":", label="centralized baseline"
    )
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    if report.config.dp:
        right = left.twinx()
        eps = [0.0] + [r.epsilon or 0.0 for r in report.rounds]
        right.plot(rounds, eps, "s--", color="tab:red", label="epsilon spent")
        right.set_ylabel("epsilon spent")
        right.legend(loc="lower right")
    c = report.config
    left.set_title(f"fedrpc simulate: {c.devices} devices, {c.partition}, {c.strategy}")
    left.legend(loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@dataclass(frozen=True)
class OwnServer:
    url: str  # of /rpc
    token: str  # the organization's admin key
    pids: tuple[int, ...]  # fedrpc serve, PostgreSQL's postmaster, weed (for CPU accounting)


@contextlib.contextmanager
def own_server() -> Iterator[OwnServer]:
    """A throwaway server: embedded PostgreSQL and S3, an organization, `fedrpc serve` in a
    child process on a free loopback port."""
    from fedrpc.cli import _create_org, load_settings
    from fedrpc.db import migrate
    from fedrpc.embedded import EmbeddedPostgres, EmbeddedS3

    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedrpc-sim-")))
        pg = stack.enter_context(EmbeddedPostgres.temporary())
        s3 = stack.enter_context(EmbeddedS3.temporary())
        settings = load_settings(
            database_url=pg.url,
            s3_endpoint=s3.endpoint,
            s3_access_key=s3.access_key,
            s3_secret_key=s3.secret_key,
        )
        asyncio.run(migrate(settings.database_url))
        _, token = asyncio.run(_create_org(settings, "simulation"))
        port = _free_port()
        env = {
            **os.environ,
            "DATABASE_URL": pg.url,
            "FEDRPC_S3_ENDPOINT": s3.endpoint,
            "FEDRPC_S3_ACCESS_KEY": s3.access_key,
            "FEDRPC_S3_SECRET_KEY": s3.secret_key,
            "FEDRPC_HOST": "127.0.0.1",
            "FEDRPC_PORT": str(port),
            "FEDRPC_DATA_DIR": str(scratch),
            # Hundreds of simulated devices register with the one org key at once.
            "FEDRPC_RATE_LIMIT_PER_SECOND": "100000",
            "FEDRPC_RATE_LIMIT_BURST": "100000",
            "FEDRPC_LOG_LEVEL": "WARNING",
        }
        log = stack.enter_context(open(scratch / "server.log", "wb"))
        server = subprocess.Popen(
            [sys.executable, "-m", "fedrpc.cli", "serve"], env=env, stdout=log, stderr=log
        )
        stack.callback(_stop, server)
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, server, scratch / "server.log")
        yield OwnServer(f"{url}/rpc", token, (server.pid, pg.pid, s3.pid))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SimulateError(f"fedrpc simulate: the server exited; its log: {log}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.2)
    raise SimulateError(f"fedrpc simulate: the server did not become ready; its log: {log}")


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
