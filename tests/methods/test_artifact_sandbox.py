"""Org-supplied models are parsed and run in a sandbox child: crafted ones cost a bad_request.

The crafted graphs are built here with onnx.helper, independently of the server's code; each
is registered with the MLP bundle's weights and program, so everything but the graph is valid.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import zipfile

import msgspec
import numpy as np
import pytest
import safetensors.numpy
import torch
from onnx import TensorProto, helper, numpy_helper

from fedrpc.app import create_app
from fedrpc.services.artifact_sandbox import SANDBOX
from tests.conftest import RpcClient, register_device
from tests.methods.conftest import b64, inline

MEMORY = 512 * 1024**2


@pytest.fixture
def settings(settings):
    return msgspec.structs.replace(
        settings, artifact_check_memory_bytes=MEMORY, artifact_check_seconds=30.0
    )


@pytest.fixture
async def model(client, org) -> dict:
    return await client.ok("models.create", {"name": "crafted"}, org.token)


@pytest.fixture
async def warm(client) -> None:
    """The validator process (started with the app) has finished its warm-up."""
    deadline = time.monotonic() + 180
    while not SANDBOX._worker.ensure()[1]:
        assert time.monotonic() < deadline, "the validator process never became ready"
        await asyncio.sleep(0.1)


def _model(nodes, inputs, outputs, initializers=()) -> bytes:
    graph = helper.make_graph(nodes, "crafted", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def _tensor(name: str, dims) -> object:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def huge_input_graph() -> bytes:
    """Declares a [1e9, 1e9] input: 10^18 floats if anyone built a tensor of that shape."""
    dims = [1_000_000_000, 1_000_000_000]
    return _model(
        [helper.make_node("Relu", ["x"], ["y"])], [_tensor("x", dims)], [_tensor("y", dims)]
    )


def allocating_graph(elements: int) -> bytes:
    """y = x + sum(ones(elements)), the count computed from the batch size so nothing folds."""
    count = numpy_helper.from_array(np.array([elements], dtype=np.int64), "count")
    one = numpy_helper.from_array(np.array([1.0], dtype=np.float32))
    nodes = [
        helper.make_node("Shape", ["x"], ["b"], start=0, end=1),
        helper.make_node("Div", ["b", "b"], ["unit"]),
        helper.make_node("Mul", ["unit", "count"], ["n"]),
        helper.make_node("ConstantOfShape", ["n"], ["ones"], value=one),
        helper.make_node("ReduceSum", ["ones"], ["total"], keepdims=0),
        helper.make_node("Add", ["x", "total"], ["y"]),
    ]
    io_ = [_tensor("x", ["batch", 6])], [_tensor("y", ["batch", 6])]
    return _model(nodes, *io_, initializers=[count])


def looping_graph(trips: int = 10**12) -> bytes:
    """y = x + trips, one Add per iteration of an ONNX Loop."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            _tensor("acc_in", ["batch", 6]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            _tensor("acc_out", ["batch", 6]),
        ],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    limits = [
        numpy_helper.from_array(np.array(trips, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "always"),
    ]
    nodes = [helper.make_node("Loop", ["trips", "always", "x"], ["y"], body=body)]
    return _model(nodes, [_tensor("x", ["batch", 6])], [_tensor("y", ["batch", 6])], limits)


def worker_children() -> list[int]:
    """Live processes whose parent is the sandbox's validator process."""
    proc = SANDBOX._worker._proc
    if proc is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proc.pid and fields[0] != "Z":
                found.append(int(entry))
    return found


async def assert_server_answers(client, org) -> None:
    assert (await client.ok("system.ping", {}, org.token)) is not None
    resp = await client.http.get("/healthz")
    assert resp.status == 200


async def test_a_huge_declared_input_is_refused_before_any_tensor_is_built(
    client, org, model, mlp_bundle, warm
):
    started = time.monotonic()
    error = await client.error(
        "models.versions.create",
        {"model_id": model["id"], **inline(mlp_bundle[1], onnx=huge_input_graph())},
        org.token,
    )
    assert error["data"]["type"] == "bad_request"
    assert error["data"]["message"].startswith("onnx_data: the declared input shape")
    assert "1,000,000" in error["data"]["message"]
    assert time.monotonic() - started < 3  # a cap, not a 4 EB allocation that fails


@pytest.mark.parametrize("elements", [2**28, 10**10], ids=["1GiB", "40GB"])
async def test_a_graph_that_allocates_past_the_memory_limit_is_refused_and_the_server_carries_on(
    client, org, model, mlp_bundle, elements
):
    error = await client.error(
        "models.versions.create",
        {"model_id": model["id"], **inline(mlp_bundle[1], onnx=allocating_graph(elements))},
        org.token,
    )
    assert error["data"]["type"] == "bad_request"
    assert error["data"]["reason"] == "memory_limit" and error["data"]["field"] == "onnx"
    assert error["data"]["memory_limit_bytes"] == MEMORY
    assert error["data"]["message"] == (
        "onnx_data: checking it needed more memory than the 512 MiB a check may use"
    )
    await assert_server_answers(client, org)
    # The sandbox recovers: the real bundle is checked and registered next.
    version = await client.ok(
        "models.versions.create", {"model_id": model["id"], **inline(mlp_bundle[1])}, org.token
    )
    assert version["version"] == 1


async def test_a_graph_that_runs_past_the_time_limit_is_refused_while_the_server_answers(
    aiohttp_client, client, settings, org, other_org, model, mlp_bundle, monkeypatch
):
    import fedrpc.services.artifact_sandbox as sandbox

    monkeypatch.setattr(sandbox, "SLOT_WAIT", 0.2)
    quick = msgspec.structs.replace(
        settings, artifact_check_seconds=2.0, artifact_check_concurrency=2
    )
    fast = RpcClient(await aiohttp_client(create_app(quick)))
    theirs = await fast.ok("models.create", {"name": "theirs"}, other_org.token)
    params = {"model_id": model["id"], **inline(mlp_bundle[1], onnx=looping_graph())}
    started = time.monotonic()
    looping = asyncio.ensure_future(fast.error("models.versions.create", params, org.token))
    await asyncio.sleep(0.5)
    # While the loop spins in its child: the server answers at once; the same organization's
    # next check finds no slot open to it (one of two, so another tenant keeps one) and gets a
    # retryable answer; another organization's model is checked and registered meanwhile.
    before = time.monotonic()
    await assert_server_answers(fast, org)
    assert time.monotonic() - before < 1.0
    busy = await fast.error(
        "models.versions.create", {"model_id": model["id"], **inline(mlp_bundle[1])}, org.token
    )
    assert busy["data"]["type"] == "rate_limited"
    assert busy["data"]["reason"] == "artifact_checks_busy"
    registered = await fast.ok(
        "models.versions.create",
        {"model_id": theirs["id"], **inline(mlp_bundle[1])},
        other_org.token,
    )
    assert registered["version"] == 1 and not looping.done()
    error = await looping
    elapsed = time.monotonic() - started
    assert error["data"]["type"] == "bad_request"
    assert error["data"]["reason"] == "time_limit" and error["data"]["field"] == "onnx"
    assert error["data"]["message"] == (
        "onnx_data: checking it took longer than the 2 s a check may take"
    )
    assert 1.5 < elapsed < 2.0 + 5.0  # the limit, plus the grace the server allows at most
    for _ in range(50):  # the child was stopped and reaped, not left spinning
        if not worker_children():
            break
        await asyncio.sleep(0.05)
    assert worker_children() == []


def _rezip(program: bytes, replace: dict[str, bytes]) -> bytes:
    """The archive with some entries' bytes replaced, still stored (the layout torch writes)."""
    source = zipfile.ZipFile(io.BytesIO(program))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            relative = info.filename.split("/", 1)[1]
            target.writestr(info.filename, replace.get(relative, source.read(info)))
    return out.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "garbage_graph", "garbage_weights", "noise"])
async def test_truncated_or_garbage_programs_are_refused(client, org, model, mlp_bundle, damage):
    program = mlp_bundle[1]["program"]
    broken = {
        "truncated": lambda: program[: len(program) // 2],
        "garbage_graph": lambda: _rezip(program, {"models/model.json": b'{"graph": [1, 2'}),
        "garbage_weights": lambda: _rezip(program, {"data/weights/weight_0": b"\xff" * 7}),
        "noise": lambda: np.random.default_rng(0).bytes(40_000),
    }[damage]()
    error = await client.error(
        "models.versions.create",
        {"model_id": model["id"], **inline(mlp_bundle[1], program=broken)},
        org.token,
    )
    assert error["data"]["type"] == "bad_request"
    assert error["data"]["message"].startswith("program_data"), error
    assert "Traceback" not in error["data"]["message"]
    await assert_server_answers(client, org)


class Grows(torch.nn.Module):
    """A linear layer plus the mean of a tensor of batch**10 ones: 59,049 floats at the check's
    batch size 3, 282 million (1.1 GB) at batch 7, which new versions are checked at."""

    input_shape = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.fc(x) + x.new_ones(n, n, n, n, n, n, n, n, n, n).mean()


def grows_graph(net: Grows) -> bytes:
    """Grows as an ONNX graph built by hand: Gemm + ReduceMean(ConstantOfShape(batch x 10))."""
    weights = [
        numpy_helper.from_array(net.fc.weight.detach().numpy(), "fc.weight"),
        numpy_helper.from_array(net.fc.bias.detach().numpy(), "fc.bias"),
    ]
    one = numpy_helper.from_array(np.array([1.0], dtype=np.float32))
    nodes = [
        helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["h"], transB=1),
        helper.make_node("Shape", ["x"], ["b"], start=0, end=1),
        helper.make_node("Concat", ["b"] * 10, ["dims"], axis=0),
        helper.make_node("ConstantOfShape", ["dims"], ["ones"], value=one),
        helper.make_node("ReduceMean", ["ones"], ["m"], keepdims=0),
        helper.make_node("Add", ["h", "m"], ["y"]),
    ]
    return _model(nodes, [_tensor("x", ["batch", 6])], [_tensor("y", ["batch", 3])], weights)


async def test_a_base_that_explodes_when_a_new_version_is_made_fails_that_aggregation_only(
    client, org, model
):
    net = Grows().eval()
    example = torch.zeros(2, 6)
    program = torch.export.export(
        net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    bundle = {
        "weights": safetensors.numpy.save(state),
        "onnx": grows_graph(net),
        "program": buffer.getvalue(),
    }
    # Registration checks batch sizes 2 and 3: it passes.
    await client.ok(
        "models.versions.create", {"model_id": model["id"], **inline(bundle)}, org.token
    )
    devices = [await register_device(client, org.token) for _ in range(2)]
    rnd = await client.ok(
        "training.create_round",
        {"model_id": model["id"], "base_version": 1, "target_device_count": 2, "min_updates": 2},
        org.token,
    )
    await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
    await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
    for device in devices:
        await client.ok(
            "training.weights.upload",
            {
                "round_id": rnd["id"],
                "model_id": model["id"],
                "version": 1,
                "sample_count": 10,
                "weights": {"data": b64(safetensors.numpy.save(state))},
            },
            device["token"],
        )

    error = await client.error("training.aggregate", {"round_id": rnd["id"]}, org.token)

    assert error["data"]["type"] == "bad_request" and error["data"]["reason"] == "memory_limit"
    assert error["data"]["message"].startswith(
        "the new version's ONNX model and program could not be made: "
    )
    await assert_server_answers(client, org)
    listed = await client.ok("models.versions.list", {"model_id": model["id"]}, org.token)
    assert listed["total"] == 1  # no version 2
    got = await client.ok("training.get_round", {"round_id": rnd["id"]}, org.token)
    assert got["state"] == "running"  # a manual aggregation leaves the round to retry or cancel
