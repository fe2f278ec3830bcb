"""Tensor files that declare far more than they hold are refused before anything is allocated.

References: files written by the peer libraries themselves (``torch.save`` of
an expanded view, ``safetensors.numpy.save``) and hand-built safetensors
headers following the format's specification; norms checked against
``numpy.linalg.norm`` in float64.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import psutil
import pytest
import safetensors.numpy
import torch

from fedrpc.fl import InvalidInput
from fedrpc.fl.tensor_codecs import safetensors_layout
from fedrpc.fl.tensors import (
    MAX_ABS_VALUE,
    TensorSpec,
    check_bounded,
    decode_state_dict,
    decode_update,
    update_norm,
)

MiB = 1 << 20
MANIFEST = [TensorSpec("w", (4, 3), "float32"), TensorSpec("b", (4,), "float32")]
BOMB_SHAPE = (4096, 4096, 1024)  # 16 Gi float32 values: 64 GiB


def state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.normal(size=s.shape).astype(np.float32) for s in MANIFEST}


def torch_file(tensors: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def stride0_bomb() -> bytes:
    """What torch.save writes for an expanded view: one 4-byte storage and the 64 GiB view's sizes."""
    return torch_file({"w": torch.zeros(1).expand(*BOMB_SHAPE), "b": torch.zeros(4)})


def safetensors_file(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def within_budget(action) -> None:
    """Run ``action`` (which must raise InvalidInput) quickly and without growing the RSS."""
    process = psutil.Process()
    before, started = process.memory_info().rss, time.perf_counter()
    with pytest.raises(InvalidInput) as caught:
        action()
    assert time.perf_counter() - started < 1.0
    assert process.memory_info().rss - before < 200 * MiB
    return caught.value


def test_torch_save_of_an_expanded_view_is_a_few_bytes_declaring_64_gib():
    data = stride0_bomb()
    loaded = torch.load(io.BytesIO(data), weights_only=True)["w"]
    assert len(data) < 4096 and loaded.stride() == (0, 0, 0)
    assert loaded.untyped_storage().nbytes() == 4 and loaded.numel() * 4 == 64 << 30


def test_device_decoding_refuses_the_torch_encoding_outright():
    error = within_budget(lambda: decode_update(stride0_bomb(), "torch", MANIFEST))
    assert "safetensors" in str(error)


def test_admin_torch_decoding_refuses_a_view_larger_than_its_storage():
    error = within_budget(lambda: decode_state_dict(stride0_bomb(), "torch"))
    assert "larger than its storage" in str(error)


def test_as_strided_overlapping_view_is_refused_too():
    base = torch.arange(16, dtype=torch.float32)
    view = torch.as_strided(base, (1 << 16, 16), (0, 1))  # 4 MiB from 64 bytes
    error = within_budget(lambda: decode_state_dict(torch_file({"w": view}), "torch"))
    assert "larger than its storage" in str(error)


def test_admin_torch_decoding_still_takes_transposed_and_shared_storage_tensors():
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    flat = torch.arange(20, dtype=torch.float32)
    tensors = {"t": weight.t(), "head": flat[:4], "tail": flat[4:]}
    decoded = decode_state_dict(torch_file(tensors), "torch")
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(decoded[name], tensor.numpy())


def test_safetensors_header_declaring_64_gib_is_refused_before_allocation():
    header = {"w": {"dtype": "F32", "shape": list(BOMB_SHAPE), "data_offsets": [0, 64 << 30]}}
    data = safetensors_file(header, b"\0" * 64)
    error = within_budget(lambda: decode_update(data, "safetensors", MANIFEST))
    assert "not a valid safetensors file" in str(error)


def test_safetensors_header_whose_shape_differs_from_the_manifest_is_refused_by_name():
    # A consistent file (offsets tile the data) with a larger w: refused on the header.
    header = {
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "w": {"dtype": "F32", "shape": [8, 3], "data_offsets": [16, 112]},
    }
    data = safetensors_file(header, b"\0" * 112)
    error = within_budget(lambda: decode_update(data, "safetensors", MANIFEST))
    assert str(error) == "shape of 'w' is [8, 3], expected [4, 3]"


@pytest.mark.parametrize(
    "header, data_bytes",
    [
        pytest.param(
            {
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [8, 56]},
            },
            64,
            id="overlap",
        ),
        pytest.param(
            {
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [24, 72]},
            },
            72,
            id="gap",
        ),
        pytest.param(
            {
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [16, 64]},
            },
            80,
            id="trailing-bytes",
        ),
        pytest.param(
            {
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "w": {"dtype": "F32", "shape": [4, True], "data_offsets": [16, 64]},
            },
            64,
            id="bool-dimension",
        ),
        pytest.param({"b": [0, 16]}, 16, id="entry-not-an-object"),
        pytest.param([1, 2], 0, id="header-not-an-object"),
    ],
)
def test_inconsistent_safetensors_layouts_are_refused(header, data_bytes):
    data = safetensors_file(header, b"\0" * data_bytes)
    with pytest.raises(InvalidInput, match="not a valid safetensors file"):
        safetensors_layout(data, field="weights")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x08\0\0\0\0\0\0\0{}",
        (2**63).to_bytes(8, "little") + b"{}",
        b"\x04\0\0\0\0\0\0\0\xff\xfe{}",
    ],
    ids=["empty", "length-past-the-end", "huge-length", "not-utf8"],
)
def test_truncated_or_garbled_headers_are_refused(data):
    with pytest.raises(InvalidInput, match="not a valid safetensors file"):
        safetensors_layout(data, field="weights")


def test_layout_of_a_real_file_matches_its_tensors_and_keeps_metadata_out():
    data = safetensors.numpy.save(state(), metadata={"format": "np"})
    assert safetensors_layout(data, field="weights") == {
        "b": ("float32", (4,)),
        "w": ("float32", (4, 3)),
    }
    decoded = decode_update(data, "safetensors", MANIFEST)
    for name, values in state().items():
        np.testing.assert_array_equal(decoded[name], values)


@pytest.mark.parametrize(
    "value, message",
    [
        (3e38, "magnitude above"),
        (-1.5e12, "magnitude above"),
        (np.nan, "NaN or infinite"),
        (np.inf, "NaN or infinite"),
    ],
)
def test_values_beyond_the_bound_are_refused(value, message):
    values = state()
    values["b"][2] = value
    with pytest.raises(InvalidInput, match=message):
        check_bounded(values)


def test_values_at_the_bound_pass_in_every_floating_dtype():
    check_bounded({"w": np.full(5, MAX_ABS_VALUE, np.float64), "h": np.full(3, 65504, np.float16)})
    check_bounded({"big": np.full(1 << 20, -MAX_ABS_VALUE / 2, np.float32)})


def test_update_norm_matches_numpy_in_float64_with_and_without_a_base():
    update, base = state(1), state(2)
    want_delta = np.linalg.norm(
        np.concatenate([v.ravel().astype(np.float64) for v in update.values()])
    )
    want_weights = np.linalg.norm(
        np.concatenate(
            [(update[s.name].astype(np.float64) - base[s.name]).ravel() for s in MANIFEST]
        )
    )
    assert update_norm(update, MANIFEST) == pytest.approx(want_delta, rel=1e-12)
    assert update_norm(update, MANIFEST, base) == pytest.approx(want_weights, rel=1e-12)


def test_update_norm_of_values_whose_float32_square_overflows_is_finite():
    big = {"w": np.full((4, 3), 1e30, np.float32), "b": np.zeros(4, np.float32)}
    assert update_norm(big, MANIFEST) == pytest.approx(1e30 * np.sqrt(12), rel=1e-6)
