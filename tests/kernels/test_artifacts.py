"""Model-version validation and ONNX re-export.

References: the test's own torch networks (``tests/kernels/nets.py``) run in
eval mode, and onnxruntime / onnx.checker on the produced models. Inputs are
encoded with the safetensors and torch libraries, manifests are read off the
networks' own state dicts, and programs are loaded with ``torch.export.load``:
none of the package's encoders or manifests serves as an expectation.
"""

from __future__ import annotations

import io
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.numpy
import torch
from onnx import numpy_helper

from fedrpc.fl import InvalidInput
from fedrpc.fl.artifacts import export_version, validate_bundle
from fedrpc.fl.reweight import make_onnx_template
from fedrpc.fl.tensors import TensorSpec
from tests.kernels.nets import make_net, numpy_state, onnx_bytes, program_bytes

KINDS = ["mlp", "convbn"]


def encode_safetensors(state: dict[str, np.ndarray]) -> bytes:
    return safetensors.numpy.save(state)


def encode_torch(state: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, buffer)
    return buffer.getvalue()


def net_manifest(net: torch.nn.Module, **replace: tuple[int, ...]) -> list[TensorSpec]:
    """The net's state dict as (name, shape, dtype), in its order; `replace` changes shapes."""
    return [
        TensorSpec(name, replace.get(name, tuple(t.shape)), str(t.dtype).removeprefix("torch."))
        for name, t in net.state_dict().items()
    ]


class Bundle:
    """A base version made the way an org admin would make it."""

    def __init__(self, kind: str) -> None:
        self.net = make_net(kind, seed=1)
        self.state = numpy_state(self.net)
        self.state_bytes = encode_safetensors(self.state)
        self.program = program_bytes(self.net)
        self.onnx = onnx_bytes(self.net)


@pytest.fixture(scope="module")
def bundles() -> dict[str, Bundle]:
    return {kind: Bundle(kind) for kind in KINDS}


def validate(state_bytes: bytes, onnx_data: bytes, program: bytes, encoding="safetensors"):
    return validate_bundle(state_bytes, encoding, onnx_data, program, np.random.default_rng(0))


def edit_onnx(data: bytes, change) -> bytes:
    model = onnx.load_model_from_string(data)
    change(model)
    return model.SerializeToString()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("encoding", ["safetensors", "torch"])
def test_good_bundle_is_accepted(bundles, kind, encoding):
    b = bundles[kind]
    state_bytes = encode_torch(b.state) if encoding == "torch" else b.state_bytes

    info = validate(state_bytes, b.onnx, b.program, encoding)

    expected = [(n, tuple(t.shape), str(t.dtype)) for n, t in b.net.state_dict().items()]
    assert [(s.name, s.shape, "torch." + s.dtype) for s in info.manifest] == expected
    assert info.input_shape == (None, *b.net.input_shape)
    assert info.onnx_input_name == "x"
    # Float32 graphs of the same weights: a few float32 roundings of outputs of order 1.
    assert 0 <= info.max_abs_diff <= 1e-5


def test_the_reported_difference_is_the_onnx_models_own_offset(bundles):
    # An ONNX model whose output bias is 3e-5 above the program's differs from it by 3e-5 on
    # every output, whatever the input: within the tolerance, so accepted, and reported.
    b = bundles["mlp"]
    offset = 3e-5

    def shift(model):
        bias = next(t for t in model.graph.initializer if t.name == "fc2.bias")
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + offset, bias.name))

    info = validate(b.state_bytes, edit_onnx(b.onnx, shift), b.program)

    assert info.max_abs_diff == pytest.approx(offset, abs=2e-6)


def test_onnx_with_a_static_batch_is_accepted_and_reported(bundles):
    b = bundles["mlp"]

    def fix_batch(model):
        for info in (*model.graph.input, *model.graph.output):
            info.type.tensor_type.shape.dim[0].dim_value = 4

    info = validate(b.state_bytes, edit_onnx(b.onnx, fix_batch), b.program)

    assert info.input_shape == (4, 6)


def test_onnx_of_another_net_is_refused(bundles):
    b = bundles["convbn"]

    with pytest.raises(InvalidInput, match="^onnx_data input .* differs from program_data's input"):
        validate(b.state_bytes, bundles["mlp"].onnx, b.program)


def test_onnx_with_other_weights_is_refused(bundles):
    b = bundles["mlp"]

    def perturb(model):
        weight = next(t for t in model.graph.initializer if t.name == "fc2.bias")
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.01, weight.name))

    with pytest.raises(InvalidInput, match="^onnx_data and program_data disagree"):
        validate(b.state_bytes, edit_onnx(b.onnx, perturb), b.program)


def test_state_dict_of_another_net_is_refused(bundles):
    b = bundles["convbn"]

    with pytest.raises(InvalidInput, match="^weights_data does not match program_data: missing"):
        validate(bundles["mlp"].state_bytes, b.onnx, b.program)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("fc.weight", np.zeros((3, 99), np.float32), r"shape of 'fc.weight' is \[3, 99\]"),
        ("bn.running_var", np.ones(4, np.float64), "dtype of 'bn.running_var' is float64"),
        ("conv.bias", np.array([0, np.nan, 0, 0], np.float32), "'conv.bias' contains NaN"),
    ],
)
def test_state_dict_with_a_wrong_tensor_is_refused(bundles, name, value, message):
    b = bundles["convbn"]
    state = dict(b.state, **{name: value})

    with pytest.raises(InvalidInput, match=message):
        validate(encode_safetensors(state), b.onnx, b.program)


def test_state_dict_different_from_the_onnx_weights_is_refused(bundles):
    b = bundles["convbn"]
    other = encode_safetensors(numpy_state(make_net("convbn", seed=9)))

    with pytest.raises(InvalidInput, match="^onnx_data and program_data disagree"):
        validate(other, b.onnx, b.program)


def _external(model):
    tensor = model.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights.bin"


def _unknown_op(model):
    model.graph.node[0].op_type = "NoSuchOp"


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: d[: len(d) // 2], "^onnx_data is not a valid ONNX model"),
        (lambda d: np.random.default_rng(3).bytes(2000), "^onnx_data is not a valid ONNX model"),
        (lambda d: b"", "^onnx_data is not a valid ONNX model"),
        (lambda d: edit_onnx(d, _external), "^onnx_data refers to external data"),
        (lambda d: edit_onnx(d, _unknown_op), "^onnx_data is not a valid ONNX model .onnx.checker"),
    ],
    ids=["truncated", "random", "empty", "external-data", "unknown-op"],
)
def test_corrupt_onnx_is_refused(bundles, corrupt, message):
    b = bundles["mlp"]

    with pytest.raises(InvalidInput, match=message):
        validate(b.state_bytes, corrupt(b.onnx), b.program)


def _rezip(data: bytes, extra: dict[str, bytes] | None = None, compress: bool = False) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression=method) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
        for name, payload in (extra or {}).items():
            target.writestr(name, payload)
    return out.getvalue()


def _pickled_sample_inputs(data: bytes) -> bytes:
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            payload = source.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                buffer = io.BytesIO()
                torch.save(((Payload(),), {}), buffer)
                payload = buffer.getvalue()
            target.writestr(info.filename, payload)
    return out.getvalue()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: d[: len(d) // 2], "not a zip archive"),
        (lambda d: np.random.default_rng(4).bytes(2000), "not a zip archive"),
        (
            lambda d: _rezip(d, {"archive/data/aotinductor/model/x.so": b"\x7fELF"}),
            "unexpected entry",
        ),
        (lambda d: _rezip(d, compress=True), "compressed entries"),
        (_pickled_sample_inputs, "sample inputs are not plain tensors"),
    ],
    ids=["truncated", "random", "native-code", "compressed", "pickled-inputs"],
)
def test_corrupt_program_is_refused(bundles, corrupt, message):
    b = bundles["mlp"]

    with pytest.raises(
        InvalidInput, match="^program_data is not a plain torch.export.save archive: " + message
    ):
        validate(b.state_bytes, b.onnx, corrupt(b.program))


def test_program_without_a_dynamic_batch_is_refused(bundles):
    b = bundles["mlp"]

    with pytest.raises(InvalidInput, match="^program_data must have a dynamic batch dimension"):
        validate(b.state_bytes, b.onnx, program_bytes(b.net, dynamic=False))


def _reference_close(net: torch.nn.Module, onnx_data: bytes, batch: int, rng) -> float:
    session = ort.InferenceSession(onnx_data, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((batch, *net.input_shape)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).double().numpy()
    (actual,) = session.run(None, {session.get_inputs()[0].name: x})
    return float(np.abs(actual - expected).max()) / max(1.0, float(np.abs(expected).max()))


def _assert_is_the_net(exported, new_net: torch.nn.Module) -> None:
    """The ONNX model passes the checker and computes ``new_net``; the program holds its
    weights, computes it, and makes a valid bundle with the ONNX model."""
    onnx.checker.check_model(onnx.load_model_from_string(exported.onnx), full_check=True)
    rng = np.random.default_rng(5)
    for batch in (5, 7):
        assert _reference_close(new_net, exported.onnx, batch, rng) <= 1e-4
    module = torch.export.load(io.BytesIO(exported.program)).module()
    want = new_net.state_dict()
    got = module.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    x = torch.from_numpy(rng.standard_normal((6, *new_net.input_shape)).astype(np.float32))
    with torch.no_grad():
        assert torch.allclose(module(x), new_net(x), rtol=1e-5, atol=1e-6)
    state_bytes = encode_safetensors(numpy_state(new_net))
    info = validate(state_bytes, exported.onnx, exported.program)  # a version is a bundle too
    assert info.input_shape == (None, *new_net.input_shape)


@pytest.mark.parametrize("kind", KINDS)
def test_export_version_reproduces_the_net_with_new_weights(bundles, kind):
    new_net = make_net(kind, seed=2)  # eval mode, BatchNorm statistics random too

    # The server calls export_version from a worker thread (asyncio.to_thread).
    with ThreadPoolExecutor(1) as pool:
        exported = pool.submit(export_version, bundles[kind].program, numpy_state(new_net)).result()

    assert exported.route == "exported"
    _assert_is_the_net(exported, new_net)


@pytest.mark.parametrize("kind", KINDS)
def test_a_re_exported_graph_takes_the_next_version_by_filling_in_values(bundles, kind):
    first = export_version(bundles[kind].program, numpy_state(make_net(kind, seed=2)))
    next_net = make_net(kind, seed=3)

    exported = export_version(
        first.program, numpy_state(next_net), onnx_template=first.onnx_template
    )

    assert first.onnx_template is not None
    emptied = onnx.load_model_from_string(first.onnx_template).graph.initializer
    assert not any(i.raw_data for i in emptied if i.name in next_net.state_dict())
    assert exported.route == "filled"
    _assert_is_the_net(exported, next_net)


def test_an_uploaded_graph_that_keeps_its_tensors_is_a_template(bundles):
    b = bundles["mlp"]
    next_net = make_net("mlp", seed=3)

    template = make_onnx_template(b.onnx, net_manifest(b.net))
    exported = export_version(b.program, numpy_state(next_net), onnx_template=template)

    assert exported.route == "filled"
    _assert_is_the_net(exported, next_net)


def test_an_uploaded_graph_with_folded_batchnorm_is_no_template(bundles):
    b = bundles["convbn"]

    assert make_onnx_template(b.onnx, net_manifest(b.net)) is None


def test_a_template_with_a_tensor_of_another_shape_is_refused(bundles):
    b = bundles["mlp"]

    assert make_onnx_template(b.onnx, net_manifest(b.net, **{"fc2.bias": (4,)})) is None


def test_a_template_that_computes_with_a_stale_copy_falls_back_to_a_full_export(bundles):
    # The graph still holds fc1.weight under its name, but computes with a folded
    # copy of the base values: the names pass, the output check must not.
    b = bundles["mlp"]

    def compute_with_a_stale_copy(model):
        weight = next(i for i in model.graph.initializer if i.name == "fc1.weight")
        stale = numpy_helper.from_array(numpy_helper.to_array(weight), "fc1.weight.folded")
        model.graph.initializer.append(stale)
        for node in model.graph.node:
            node.input[:] = ["fc1.weight.folded" if i == "fc1.weight" else i for i in node.input]

    folded = edit_onnx(b.onnx, compute_with_a_stale_copy)
    template = make_onnx_template(folded, net_manifest(b.net))
    next_net = make_net("mlp", seed=3)

    exported = export_version(b.program, numpy_state(next_net), onnx_template=template)

    assert template is not None
    assert exported.route == "exported"
    _assert_is_the_net(exported, next_net)


def test_export_version_refuses_a_state_that_does_not_fit_the_program(bundles):
    state = numpy_state(make_net("mlp", seed=2))

    with pytest.raises(InvalidInput, match="missing tensor 'conv.weight'"):
        export_version(bundles["convbn"].program, state)


def test_export_version_refuses_non_finite_weights(bundles):
    state = numpy_state(make_net("mlp", seed=2))
    state["fc1.weight"][0, 0] = np.inf

    with pytest.raises(InvalidInput, match="'fc1.weight' contains NaN or infinite values"):
        export_version(bundles["mlp"].program, state)


def test_programs_load_from_several_threads_at_once():
    # torch.export.load keeps a process-global deserializer: without the package's lock two
    # aggregations (two tenants) at once failed with "_CURRENT_DESERIALIZER is already set".
    from concurrent.futures import ThreadPoolExecutor

    from fedrpc.fl.program_archive import load_program

    data = program_bytes(make_net("mlp", seed=1))
    with ThreadPoolExecutor(4) as pool:
        programs = list(pool.map(lambda _: load_program(data), range(16)))
    assert len(programs) == 16
