"""State-dict codecs, manifests, finiteness and the flat-vector layout.

References: files written and read by the peer libraries themselves
(``safetensors.torch``, ``torch.save``/``torch.load``), torch's own
bfloat16 conversion, and plain numpy loops written independently here.
"""

from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch

from fedrpc.fl import InvalidInput
from fedrpc.fl.tensors import (
    BFLOAT16,
    TensorSpec,
    check_finite,
    check_matches,
    decode_state_dict,
    dtype_name,
    encode_safetensors,
    encode_torch,
    flatten,
    manifest_from_json,
    manifest_of,
    manifest_to_json,
    unflatten,
)

DTYPES = ["float16", "bfloat16", "float32", "float64", "int64", "int32", "uint8", "bool"]
ENCODINGS = ["safetensors", "torch"]


def torch_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == "bool":
        return torch.rand(shape, generator=g) > 0.5
    if dtype in ("int64", "int32", "uint8"):
        return torch.randint(0, 200, shape, generator=g).to(getattr(torch, dtype))
    return (torch.randn(shape, generator=g) * 3).to(getattr(torch, dtype))


def peer_bytes(tensors: dict[str, torch.Tensor], encoding: str) -> bytes:
    if encoding == "safetensors":
        return safetensors.torch.save(tensors)
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def torch_values(tensor: torch.Tensor) -> np.ndarray:
    """Torch's own conversion to numpy (via float32 for bfloat16)."""
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4), (), (0, 2)])
def test_decode_reads_peer_files_exactly(encoding, dtype, shape):
    tensor = torch_tensor(dtype, shape)
    data = peer_bytes({"w": tensor, "num_batches_tracked": torch.tensor(7)}, encoding)

    state = decode_state_dict(data, encoding)

    assert set(state) == {"w", "num_batches_tracked"}
    assert dtype_name(state["w"]) == dtype
    assert state["w"].shape == shape
    np.testing.assert_array_equal(state["w"], torch_values(tensor))
    assert state["num_batches_tracked"].dtype == np.int64 and state["num_batches_tracked"] == 7


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_is_read_back_by_the_peer_and_by_decode(encoding, dtype):
    tensor = torch_tensor(dtype, (5, 2), seed=3)
    state = decode_state_dict(peer_bytes({"a.weight": tensor}, "safetensors"), "safetensors")

    data = encode_safetensors(state) if encoding == "safetensors" else encode_torch(state)

    loaded = (
        safetensors.torch.load(data)
        if encoding == "safetensors"
        else torch.load(io.BytesIO(data), weights_only=True)
    )
    assert loaded["a.weight"].dtype == tensor.dtype
    assert torch.equal(loaded["a.weight"], tensor)
    again = decode_state_dict(data, encoding)
    assert manifest_of(again) == manifest_of(state)
    np.testing.assert_array_equal(again["a.weight"], state["a.weight"])


def test_bfloat16_encoding_rounds_to_nearest_even():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(1000), [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)]])
    state = {"w": values.astype(BFLOAT16)}
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    # Round half to even on the low 16 bits, written from the definition.
    low, high = bits & 0xFFFF, bits >> 16
    up = (low > 0x8000) | ((low == 0x8000) & (high & 1 == 1))
    expected = ((high + up) << 16).astype(np.uint32).view(np.float32)

    decoded = decode_state_dict(encode_safetensors(state), "safetensors")

    np.testing.assert_array_equal(decoded["w"], expected)


class _Marker:
    calls: list[str] = []

    def __reduce__(self):
        return (_Marker.calls.append, ("unpickled",))


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _quantized_bytes() -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated
        return _torch_saved({"w": torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)})


GOOD_SAFETENSORS = safetensors.torch.save({"w": torch.ones(64, 8)})
GOOD_TORCH = _torch_saved({"w": torch.ones(64, 8)})


@pytest.mark.parametrize(
    ("encoding", "data", "message"),
    [
        pytest.param(
            "safetensors", GOOD_SAFETENSORS[:-5], "not a valid safetensors file", id="st-truncated"
        ),
        pytest.param(
            "safetensors",
            GOOD_SAFETENSORS[:40],
            "not a valid safetensors file",
            id="st-header-only",
        ),
        pytest.param(
            "safetensors",
            np.random.default_rng(1).bytes(500),
            "not a valid safetensors file",
            id="st-random",
        ),
        pytest.param("safetensors", b"", "not a valid safetensors file", id="st-empty"),
        pytest.param(
            "safetensors", GOOD_TORCH, "not a valid safetensors file", id="st-given-torch-file"
        ),
        pytest.param(
            "torch", GOOD_TORCH[:-30], "not a valid torch weights file", id="pt-truncated"
        ),
        pytest.param(
            "torch",
            np.random.default_rng(2).bytes(500),
            "not a valid torch weights file",
            id="pt-random",
        ),
        pytest.param(
            "torch", GOOD_SAFETENSORS, "not a valid torch weights file", id="pt-given-safetensors"
        ),
        pytest.param(
            "torch",
            pickle.dumps({"w": _Marker()}),
            "not a valid torch weights file",
            id="plain-pickle",
        ),
        pytest.param(
            "torch",
            _torch_saved({"w": _Marker()}),
            "not a valid torch weights file",
            id="pt-foreign-object",
        ),
        pytest.param("torch", _torch_saved([torch.ones(2)]), "flat mapping", id="pt-list"),
        pytest.param(
            "torch",
            _torch_saved({"w": {"inner": torch.ones(2)}}),
            "is not a tensor",
            id="pt-nested-dict",
        ),
        pytest.param("torch", _torch_saved({"w": 3}), "is not a tensor", id="pt-int-value"),
        pytest.param("torch", _torch_saved({1: torch.ones(2)}), "flat mapping", id="pt-int-key"),
        pytest.param(
            "torch",
            _torch_saved({"w": torch.eye(3).to_sparse()}),
            "sparse or quantized",
            id="pt-sparse",
        ),
        pytest.param(
            "torch",
            _torch_saved({"w": torch.ones(2, dtype=torch.complex64)}),
            "unsupported dtype",
            id="pt-complex",
        ),
        pytest.param(
            "torch",
            _torch_saved({"w": torch.ones(2, dtype=torch.int16)}),
            "unsupported dtype",
            id="pt-int16",
        ),
        pytest.param(
            "safetensors",
            safetensors.torch.save({"w": torch.ones(2, dtype=torch.int16)}),
            "unsupported dtype int16",
            id="st-int16",
        ),
        pytest.param("zip", GOOD_TORCH, "unknown weights encoding", id="unknown-encoding"),
    ],
)
def test_bad_bytes_are_refused_in_our_words(encoding, data, message):
    """Covers corrupt files, foreign pickles and unsupported structures."""
    _Marker.calls.clear()

    with pytest.raises(InvalidInput) as caught:
        decode_state_dict(data, encoding)

    assert message in str(caught.value)
    assert str(caught.value).startswith(("weights_data", "unknown weights encoding"))
    assert _Marker.calls == []  # nothing was unpickled


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")
def test_quantized_tensors_are_refused():
    with pytest.raises(InvalidInput, match="^weights_data: tensor 'w' is sparse or quantized"):
        decode_state_dict(_quantized_bytes(), "torch")


def test_manifest_json_round_trip_keeps_order_shapes_and_dtypes():
    state = {
        "z": np.zeros((2, 3), np.float16),
        "a": np.zeros((), np.int64),
        "m": np.zeros(4, BFLOAT16),
    }

    manifest = manifest_of(state)
    as_json = manifest_to_json(manifest)

    assert as_json == [
        {"name": "z", "shape": [2, 3], "dtype": "float16"},
        {"name": "a", "shape": [], "dtype": "int64"},
        {"name": "m", "shape": [4], "dtype": "bfloat16"},
    ]
    assert manifest_from_json(as_json) == manifest


@pytest.mark.parametrize(
    "value",
    [
        {"name": "a"},
        [{"name": "a", "shape": [1]}],
        [{"name": "a", "shape": [1], "dtype": "float32", "extra": 1}],
        [{"name": 3, "shape": [1], "dtype": "float32"}],
        [{"name": "a", "shape": [-1], "dtype": "float32"}],
        [{"name": "a", "shape": [True], "dtype": "float32"}],
        [{"name": "a", "shape": "1", "dtype": "float32"}],
        [{"name": "a", "shape": [1], "dtype": "complex64"}],
        [{"name": "a", "shape": [1], "dtype": "float32"}] * 2,
    ],
)
def test_malformed_manifest_json_is_refused(value):
    with pytest.raises(InvalidInput):
        manifest_from_json(value)


MANIFEST = [
    TensorSpec("w", (2, 3), "float32"),
    TensorSpec("b", (3,), "bfloat16"),
    TensorSpec("n", (), "int64"),
]


def matching_state() -> dict[str, np.ndarray]:
    return {"n": np.array(1), "b": np.zeros(3, BFLOAT16), "w": np.zeros((2, 3), np.float32)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("w"), "missing tensor 'w'"),
        (lambda s: s.update(extra=np.zeros(1, np.float32)), "unexpected tensor 'extra'"),
        (
            lambda s: s.update(w=np.zeros((3, 2), np.float32)),
            "shape of 'w' is [3, 2], expected [2, 3]",
        ),
        (
            lambda s: s.update(w=np.zeros((2, 3), np.float64)),
            "dtype of 'w' is float64, expected float32",
        ),
        (
            lambda s: s.update(b=np.zeros(3, np.float32)),
            "dtype of 'b' is float32, expected bfloat16",
        ),
        (lambda s: s.update(n=np.array(1, np.int32)), "dtype of 'n' is int32, expected int64"),
        (
            lambda s: s.update(w=np.zeros((2, 3), np.complex64)),
            "tensor 'w' has unsupported dtype complex64",
        ),
    ],
)
def test_check_matches_names_the_first_difference(change, message):
    state = matching_state()
    check_matches(state, MANIFEST)  # the unchanged state matches
    change(state)

    with pytest.raises(InvalidInput, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        check_matches(state, MANIFEST)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("index", [0, 300_000, 599_999])
def test_check_finite_finds_any_non_finite_value(dtype, bad, index):
    holder = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    state = {"ok": np.ones(10, holder), "bad": np.ones(600_000, holder)}
    state["bad"][index] = bad

    with pytest.raises(InvalidInput, match="tensor 'bad' contains NaN or infinite values"):
        check_finite(state)


def test_check_finite_accepts_huge_finite_values_whose_sum_overflows():
    state = {
        "w": np.full(1_000, np.finfo(np.float32).max, np.float32),
        "h": np.full((30, 30), np.finfo(np.float16).max, np.float16),
        "n": np.array([np.iinfo(np.int64).max]),
    }

    check_finite(state)


FLAT_MANIFEST = [
    TensorSpec("conv.weight", (4, 3, 2, 2), "float32"),
    TensorSpec("bn.num_batches_tracked", (), "int64"),
    TensorSpec("bn.running_mean", (4,), "float64"),
    TensorSpec("mask", (3,), "bool"),
    TensorSpec("fc.weight", (5, 6), "float16"),
    TensorSpec("fc.bias", (5,), "bfloat16"),
]


def random_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {}
    for spec in reversed(FLAT_MANIFEST):  # order differs from the manifest on purpose
        if spec.dtype == "int64":
            state[spec.name] = np.array(seed, np.int64)
        elif spec.dtype == "bool":
            state[spec.name] = rng.random(spec.shape) > 0.5
        elif spec.dtype == "bfloat16":
            g = torch.Generator().manual_seed(seed)
            values = torch.randn(spec.shape, generator=g, dtype=torch.bfloat16).float().numpy()
            state[spec.name] = values.astype(BFLOAT16)
        else:
            state[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
    return state


def test_flatten_concatenates_floating_tensors_in_manifest_order():
    state = random_state(1)
    reference = []
    for spec in FLAT_MANIFEST:
        if spec.dtype.startswith(("float", "bfloat")):
            for value in state[spec.name].flat:
                reference.append(np.float32(value))

    vector = flatten(state, FLAT_MANIFEST)

    assert vector.dtype == np.float32
    np.testing.assert_array_equal(vector, np.array(reference, dtype=np.float32))


def test_unflatten_inverts_flatten_and_takes_other_tensors_from_the_template():
    state, template = random_state(1), random_state(2)
    state["bn.running_mean"] = state["bn.running_mean"].astype(np.float32).astype(np.float64)

    rebuilt = unflatten(flatten(state, FLAT_MANIFEST), FLAT_MANIFEST, template)

    assert list(rebuilt) == [s.name for s in FLAT_MANIFEST]
    assert manifest_of(rebuilt) == FLAT_MANIFEST
    for spec in FLAT_MANIFEST:
        source = template if spec.dtype in ("int64", "bool") else state
        np.testing.assert_array_equal(rebuilt[spec.name], source[spec.name])
    rebuilt["bn.num_batches_tracked"] += 1
    assert template["bn.num_batches_tracked"] == 2  # a copy, not the template's array


@pytest.mark.parametrize("length_change", [-1, 1])
def test_unflatten_refuses_a_vector_of_the_wrong_length(length_change):
    vector = flatten(random_state(1), FLAT_MANIFEST)
    wrong = np.zeros(vector.size + length_change, np.float32)

    with pytest.raises(InvalidInput, match="flat vector has"):
        unflatten(wrong, FLAT_MANIFEST, random_state(2))


def test_unflatten_refuses_values_beyond_float16():
    vector = flatten(random_state(1), FLAT_MANIFEST)
    vector[-6] = 1e6  # inside fc.weight (float16), before the 5 values of fc.bias

    with pytest.raises(InvalidInput, match="'fc.weight' has values beyond the float16 range"):
        unflatten(vector, FLAT_MANIFEST, random_state(2))


def test_flatten_refuses_float64_values_beyond_float32():
    state = random_state(1)
    state["bn.running_mean"][0] = 1e300

    with pytest.raises(InvalidInput, match="'bn.running_mean' has values beyond the float32 range"):
        flatten(state, FLAT_MANIFEST)
