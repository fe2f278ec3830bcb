"""fedrpc simulate: real federated training of simulated devices through the real server.

The devices train the digits network on load_digits partitions through DeviceAgent
over HTTP; the driver aggregates each round into a new version and scores its ONNX
artifact. The references are independent of that path: the same version's
safetensors weights run through the network in plain torch, a centralized
baseline on the same split (and scikit-learn's logistic regression for it), and
dp-accounting's RDP accountant for the epsilon.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp
import dp_accounting
import numpy as np
import pytest
import safetensors.torch
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from fedrpc.sim import digits
from fedrpc.sim.run import SimConfig, simulate


def url_of(client) -> str:
    return str(client.http.make_url("/rpc"))


@pytest.fixture(scope="module")
def split() -> digits.Split:
    return digits.load_split(0)


@pytest.fixture(scope="module")
def baseline(split) -> float:
    return digits.centralized_baseline(split)


def test_the_centralized_baseline_is_what_logistic_regression_reaches(split, baseline):
    from sklearn.linear_model import LogisticRegression

    reference = LogisticRegression(max_iter=2000).fit(split.x_train, split.y_train)
    assert baseline > 0.95
    assert abs(baseline - reference.score(split.x_test, split.y_test)) < 0.03


def test_partitions_cover_the_training_set_once():
    labels = np.repeat(np.arange(10), 30)
    for scheme in ("iid", "dirichlet:0.5"):
        parts = digits.partition(labels, 12, scheme, seed=3)
        joined = np.sort(np.concatenate(parts))
        assert np.array_equal(joined, np.arange(len(labels))) and all(len(p) for p in parts)
    skewed = digits.partition(labels, 12, "dirichlet:0.1", seed=3)
    # Dirichlet(0.1) gives most devices a few classes; IID gives every device nearly all ten.
    assert np.median([len(set(labels[p])) for p in skewed]) < 6
    with pytest.raises(ValueError):
        digits.partition(labels, 3, "dirichlet:-1")


async def torch_accuracy(client, org, model_id: str, version: int, split) -> float:
    """The version's accuracy from its safetensors weights in plain torch (not its ONNX)."""
    links = await client.ok(
        "models.versions.download",
        {"model_id": model_id, "version": version, "kinds": ["safetensors"]},
        org.token,
    )
    async with aiohttp.ClientSession() as http, http.get(links["artifacts"][0]["url"]) as resp:
        state = safetensors.torch.load(await resp.read())
    net = digits.make_net()
    net.load_state_dict(state)
    with torch.no_grad():
        predicted = net(torch.from_numpy(split.x_test)).argmax(1).numpy()
    return float((predicted == split.y_test).mean())


async def test_ten_devices_three_rounds_learn_the_digits(client, org, split, baseline):
    config = SimConfig(devices=10, rounds=3, seed=1)

    report = await simulate(config, url_of(client), org.token)

    accuracies = [r.accuracy for r in report.rounds]
    assert all(r.version == i + 2 for i, r in enumerate(report.rounds)), report.rounds
    assert all(r.participants == r.selected == 10 and not r.failures for r in report.rounds)
    assert report.base_accuracy < 0.25  # the untrained network guesses
    assert accuracies[0] > report.base_accuracy and accuracies[-1] > accuracies[0]
    assert report.centralized_accuracy > 0.95 and accuracies[-1] > baseline - 0.1
    # The ONNX artifact scored by the simulator is the version the server stored.
    last = report.rounds[-1]
    assert accuracies[-1] == await torch_accuracy(client, org, report.model_id, last.version, split)
    version = await client.ok(
        "models.versions.get", {"model_id": report.model_id, "version": last.version}, org.token
    )
    assert version["num_updates"] == 10 and version["total_samples"] == len(split.y_train)


@pytest.mark.parametrize("strategy", ["fedadam", "fedmedian"])
async def test_other_server_strategies_learn_too(client, org, strategy):
    config = SimConfig(devices=6, rounds=2, strategy=strategy, seed=3)

    report = await simulate(config, url_of(client), org.token)

    for r in report.rounds:
        assert r.version is not None and r.participants == 6 and not r.failures, r
        rnd = await client.ok("training.get_round", {"round_id": r.round_id}, org.token)
        assert rnd["strategy"] == strategy
    assert report.final_accuracy > report.base_accuracy + 0.2


async def test_secure_aggregation_with_dropouts_still_learns(client, org, split):
    config = SimConfig(
        devices=10, rounds=3, secure_aggregation=True, dropout=0.2, stage_seconds=2, seed=2
    )

    report = await simulate(config, url_of(client), org.token)

    for r in report.rounds:
        assert r.version is not None and not r.failures, r
        assert r.dropouts == 2 and r.participants >= 8
        status = await client.ok("training.secagg.status", {"round_id": r.round_id}, org.token)
        assert status["stage"] == "completed"
        assert status["survivors_count"] == r.participants
    accuracies = [r.accuracy for r in report.rounds]
    assert accuracies[-1] > accuracies[0] > report.base_accuracy
    assert accuracies[-1] > 0.8


def composed_epsilon(z: float, rates: list[float], delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    for q in rates:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return float(accountant.get_epsilon(delta))


async def test_dp_epsilon_in_the_output_is_the_ledgers_and_dp_accountings(client, org):
    config = SimConfig(
        devices=20, rounds=2, dp_noise=1.0, dp_clip=1.0, fraction=0.5, epsilon_budget=100.0
    )

    report = await simulate(config, url_of(client), org.token)

    state = await client.ok(
        "federations.privacy.get", {"federation_id": report.federation_id}, org.token
    )
    assert report.rounds[-1].epsilon == state["current_epsilon_spent"]
    assert 0 < report.rounds[0].epsilon < report.rounds[1].epsilon
    rates = []
    for r in report.rounds:
        rnd = await client.ok("training.get_round", {"round_id": r.round_id}, org.token)
        rates.append(rnd["sample_rate"])
    assert rates == [0.5, 0.5]
    assert state["current_epsilon_spent"] == pytest.approx(
        composed_epsilon(1.0, rates, state["delta"]), rel=1e-6
    )


async def run_cli(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedrpc.cli", "simulate", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    return proc.returncode, out.decode(), err.decode()


async def test_the_command_prints_rounds_and_writes_the_plot_and_json(
    client, org, tmp_path, monkeypatch
):
    import os

    env = {**os.environ, "FEDRPC_TOKEN": org.token}
    plot, report = tmp_path / "sim.png", tmp_path / "sim.json"

    code, out, err = await run_cli(
        "--url", url_of(client), "--devices", "4", "--rounds", "2", "--partition",
        "dirichlet:0.5", "--strategy", "fedprox", "--quiet", "--plot", str(plot),
        "--json", str(report), env=env,
    )  # fmt: skip

    assert code == 0, err
    written = json.loads(report.read_text())
    assert [r["number"] for r in written["rounds"]] == [1, 2]
    assert written["config"]["steps"]["proximal_mu"] == 0.01
    assert f"{written['final_accuracy']:.4f}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dp", "noise=x"], "--dp"),
        (["--dp", "noise=1"], "clip="),
        (["--partition", "zipf"], "--partition"),
        (["--dropout", "1.5"], "--dropout"),
        (["--epochs", "0"], "--epochs"),
        (["--learning-rate", "0"], "--learning-rate"),
    ],
)
async def test_bad_flags_stop_the_command_with_one_line(flags, message):
    code, out, err = await run_cli("--url", "http://127.0.0.1:9/rpc", *flags)
    assert code == 1 and message in err and "Traceback" not in err


async def test_a_run_the_server_refuses_stops_with_its_type(client, org):
    import os

    env = {**os.environ, "FEDRPC_TOKEN": org.token}
    code, _, err = await run_cli(
        "--url", url_of(client), "--devices", "2", "--dp", "noise=-1,clip=1", env=env
    )
    assert code == 1 and "bad_request" in err and "Traceback" not in err
    code, _, err = await run_cli("--url", url_of(client), "--strategy", "fedbest", env=env)
    assert code == 2 and "--strategy" in err


async def test_without_a_key_the_command_says_where_it_is_looked_for(monkeypatch):
    import os

    env = {k: v for k, v in os.environ.items() if k != "FEDRPC_TOKEN"}
    code, _, err = await run_cli("--url", "http://127.0.0.1:9/rpc", env=env)
    assert code == 1 and "FEDRPC_TOKEN" in err
