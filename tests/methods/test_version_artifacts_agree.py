"""A trained version's artifacts say the same thing, and what they say is the right aggregate.

After each of two FedAvg rounds over HTTP the new version's four artifacts are downloaded and
read with their own libraries: the safetensors file with ``safetensors.numpy``, the torch file
with ``torch.load(weights_only=True)``, the program with ``torch.export.load``, the ONNX model
with onnxruntime. Each is compared with a float64 aggregate computed here from the uploaded
deltas, and the ONNX model's and the program's outputs with the test's own ``nn.Module``
carrying those float64 weights; none of the references is a server artifact.
"""

from __future__ import annotations

import io

import aiohttp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.numpy
import torch
from onnx import numpy_helper

from tests.conftest import register_device
from tests.kernels.nets import NETS, numpy_state
from tests.methods.conftest import inline, upload_delta

KINDS = {"safetensors", "torch", "program", "onnx"}
COUNTS = [3, 40, 700]
# Float32 rounding only: stored weights within ULPS units in the last place of the tensor's
# largest value, outputs within OUTPUT_RTOL of max(1, max |output|).
ULPS = 2
OUTPUT_RTOL = 1e-5


async def download_all(client, token, model_id, version) -> dict[str, bytes]:
    links = await client.ok(
        "models.versions.download", {"model_id": model_id, "version": version}, token
    )
    assert {link["kind"] for link in links["artifacts"]} == KINDS
    blobs = {}
    async with aiohttp.ClientSession() as http:
        for link in links["artifacts"]:
            async with http.get(link["url"]) as resp:
                assert resp.status == 200
                blobs[link["kind"]] = await resp.read()
    return blobs


def float64_fedavg(base: dict[str, np.ndarray], deltas: list[dict], counts: list[int]) -> dict:
    """Base plus the sample-weighted mean delta, in float64; integer buffers stay the base's."""
    total = float(sum(counts))
    out = {}
    for name, value in base.items():
        if value.dtype.kind != "f":
            out[name] = value.copy()
            continue
        mean = sum(d[name].astype(np.float64) * c for d, c in zip(deltas, counts, strict=True))
        out[name] = value.astype(np.float64) + mean / total
    return out


def reference_module(kind: str, state: dict[str, np.ndarray]) -> torch.nn.Module:
    """The test's own network, in float64, carrying `state`."""
    net = NETS[kind]().double().eval()
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    return net


def relative_output_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want))) / max(
        1.0, float(np.max(np.abs(want)))
    )


def check_artifacts(kind: str, blobs: dict[str, bytes], want: dict[str, np.ndarray]) -> None:
    # safetensors: the float64 aggregate, rounded once to float32; same names, shapes, dtypes.
    weights = safetensors.numpy.load(blobs["safetensors"])
    assert set(weights) == set(want)
    for name, value in want.items():
        got = weights[name]
        assert got.shape == value.shape
        if value.dtype.kind == "f":
            assert got.dtype == np.float32
            ulp = float(np.spacing(np.float32(np.max(np.abs(value)))))
            np.testing.assert_allclose(got, value, rtol=0, atol=ULPS * ulp, err_msg=name)
        else:
            assert got.dtype == value.dtype and np.array_equal(got, value), name

    # torch: the same tensors, bit for bit.
    state = torch.load(io.BytesIO(blobs["torch"]), weights_only=True)
    assert set(state) == set(weights)
    for name, tensor in state.items():
        assert np.array_equal(tensor.numpy(), weights[name]), name
        assert tensor.numpy().dtype == weights[name].dtype

    # The program: its module holds the same tensors and computes the reference network.
    program = torch.export.load(io.BytesIO(blobs["program"]))
    module = program.module()
    for name, tensor in module.state_dict().items():
        assert np.array_equal(tensor.detach().numpy(), weights[name]), name

    # ONNX: onnxruntime's outputs are the reference network's, at two batch sizes.
    reference = reference_module(kind, want)
    session = ort.InferenceSession(blobs["onnx"], providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for batch in (5, 8):
        x = rng.standard_normal((batch, *reference.input_shape)).astype(np.float32)
        with torch.no_grad():
            expected = reference(torch.from_numpy(x).double()).numpy()
            from_program = module(torch.from_numpy(x)).numpy()
        (from_onnx,) = session.run(None, {session.get_inputs()[0].name: x})
        assert relative_output_error(from_onnx, expected) <= OUTPUT_RTOL
        assert relative_output_error(from_program, expected) <= OUTPUT_RTOL
    if kind == "mlp":
        # Its graph keeps every tensor as an initializer of the same name: the same bits.
        graph = onnx.load_model_from_string(blobs["onnx"]).graph
        initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for name in weights:
            assert np.array_equal(initializers[name], weights[name]), name


@pytest.mark.parametrize("kind", ["mlp", "convbn"])
async def test_every_artifact_of_a_trained_version_is_the_float64_aggregate(
    client, org, mlp_bundle, convbn_bundle, kind
):
    net, bundle = {"mlp": mlp_bundle, "convbn": convbn_bundle}[kind]
    model = await client.ok("models.create", {"name": kind}, org.token)
    await client.ok(
        "models.versions.create", {"model_id": model["id"], **inline(bundle)}, org.token
    )
    devices = [await register_device(client, org.token) for _ in COUNTS]
    base = numpy_state(net)
    for version, seed in ((1, 10), (2, 20)):
        rnd = await client.ok(
            "training.create_round",
            {
                "model_id": model["id"],
                "base_version": version,
                "target_device_count": len(devices),
                "min_updates": len(devices),
            },
            org.token,
        )
        await client.ok("training.select_devices", {"round_id": rnd["id"]}, org.token)
        await client.ok("training.start_round", {"round_id": rnd["id"]}, org.token)
        rng = np.random.default_rng(seed)
        # Integer buffers (BatchNorm's num_batches_tracked) are sent as they were.
        deltas = [
            {
                k: rng.normal(0, 0.05, v.shape).astype(np.float32) if v.dtype.kind == "f" else v
                for k, v in base.items()
            }
            for _ in devices
        ]
        for device, delta, count in zip(devices, deltas, COUNTS, strict=True):
            await upload_delta(client, rnd, device["token"], delta, count)
        made = await client.ok("training.aggregate", {"round_id": rnd["id"]}, org.token)
        assert made["version"] == version + 1

        want = float64_fedavg(base, deltas, COUNTS)
        check_artifacts(kind, await download_all(client, org.token, model["id"], version + 1), want)
        base = want
