"""Central DP (DP-FedAvg server side): clipping, uniform mean, Gaussian noise."""

from __future__ import annotations

import numpy as np
import pytest

from fedrpc.fl import InvalidInput
from fedrpc.fl.central_dp import CentralDPAccumulator


def with_norms(seed: int, norms: list[float], size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for norm in norms:
        direction = rng.standard_normal(size)
        out.append((direction * norm / np.linalg.norm(direction)).astype(np.float32))
    return out


def reference_clipped_mean(deltas: list[np.ndarray], clip: float) -> np.ndarray:
    rows = []
    for d in deltas:
        d = d.astype(np.float64)
        rows.append(d * min(1.0, clip / np.sqrt(np.dot(d, d))))
    return np.mean(rows, axis=0)


@pytest.mark.parametrize(
    ("norms", "clip", "clipped"),
    [
        ([0.5, 1.5, 3.0, 0.9, 2.0], 1.0, 3),
        ([0.1, 0.2], 1.0, 0),
        ([10.0, 20.0, 30.0], 0.5, 3),
        ([4.0] * 20 + [1.0] * 17, 2.0, 20),
    ],
)
@pytest.mark.parametrize("size", [3, 1000])
def test_clipping_matches_the_reference_and_reports_the_fraction(
    norms: list[float], clip: float, clipped: int, size: int
) -> None:
    deltas = with_norms(len(norms) + size, norms, size)
    acc = CentralDPAccumulator(size, clipping_norm=clip, noise_multiplier=0.0)

    seen = [acc.add(d) for d in deltas]
    result = acc.finish(np.random.default_rng(0))

    np.testing.assert_allclose(
        result.vector, reference_clipped_mean(deltas, clip), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(seen, norms, rtol=1e-6)
    assert result.num_clipped == clipped
    assert result.fraction_clipped == clipped / len(norms)
    assert result.num_updates == len(norms) and result.noise_std == 0.0


def test_a_clipped_update_never_exceeds_the_clipping_norm() -> None:
    deltas = with_norms(1, [1e6, 3.0, 1.0 + 1e-6], 100_000)
    for d in deltas:
        acc = CentralDPAccumulator(d.size, clipping_norm=1.0, noise_multiplier=0.0)
        acc.add(d)

        norm = np.linalg.norm(acc.finish(np.random.default_rng(0)).vector.astype(np.float64))

        assert norm <= 1.0
        assert norm == pytest.approx(1.0, rel=1e-5)


def test_sample_counts_play_no_part_every_update_weighs_the_same() -> None:
    deltas = with_norms(2, [0.3, 0.4, 0.2], 50)
    acc = CentralDPAccumulator(50, clipping_norm=1.0, noise_multiplier=0.0)

    for d in deltas:
        acc.add(d)

    expected = np.mean(np.stack(deltas).astype(np.float64), axis=0)
    np.testing.assert_allclose(
        acc.finish(np.random.default_rng(0)).vector, expected, rtol=1e-6, atol=1e-8
    )


@pytest.mark.parametrize(("z", "clip", "m"), [(1.1, 0.7, 4), (0.5, 2.0, 1), (3.0, 0.1, 25)])
def test_noise_has_the_dp_fedavg_standard_deviation(z: float, clip: float, m: int) -> None:
    size = 200_000
    acc = CentralDPAccumulator(size, clipping_norm=clip, noise_multiplier=z)
    for _ in range(m):
        acc.add(np.zeros(size, dtype=np.float32))

    result = acc.finish(np.random.default_rng(20240601))

    sigma = z * clip / m
    noise = result.vector.astype(np.float64)
    assert result.noise_std == pytest.approx(sigma)
    # Fixed seed and 6-sigma bounds: the sample std of n normals has a
    # standard error of sigma / sqrt(2 n), the sample mean sigma / sqrt(n).
    assert abs(noise.std() - sigma) <= 6 * sigma / np.sqrt(2 * size)
    assert abs(noise.mean()) <= 6 * sigma / np.sqrt(size)


def test_noise_comes_only_from_the_callers_generator() -> None:
    deltas = with_norms(3, [0.5, 2.0], 1000)

    def run(seed: int) -> np.ndarray:
        acc = CentralDPAccumulator(1000, clipping_norm=1.0, noise_multiplier=1.0)
        for d in deltas:
            acc.add(d)
        return acc.finish(np.random.default_rng(seed)).vector

    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def test_full_weights_are_clipped_as_deltas_from_the_base() -> None:
    rng = np.random.default_rng(4)
    base = rng.standard_normal(500).astype(np.float32)
    deltas = with_norms(4, [0.5, 5.0, 1.5], 500)
    acc = CentralDPAccumulator(500, clipping_norm=1.0, noise_multiplier=0.0, base=base)

    for d in deltas:
        acc.add(base + d)
    result = acc.finish(np.random.default_rng(0))

    np.testing.assert_allclose(
        result.vector, reference_clipped_mean(deltas, 1.0), rtol=1e-4, atol=1e-6
    )
    assert result.num_clipped == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"clipping_norm": 0.0, "noise_multiplier": 1.0}, "clipping_norm must be > 0"),
        ({"clipping_norm": float("inf"), "noise_multiplier": 1.0}, "clipping_norm must be > 0"),
        (
            {"clipping_norm": 1.0, "noise_multiplier": -0.1},
            "noise_multiplier must be a number >= 0",
        ),
        (
            {"clipping_norm": 1.0, "noise_multiplier": float("nan")},
            "noise_multiplier must be a number >= 0",
        ),
        ({"clipping_norm": "1", "noise_multiplier": 1.0}, "clipping_norm must be a number > 0"),
    ],
)
def test_central_dp_refuses_bad_parameters(options: dict, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        CentralDPAccumulator(10, **options)

    assert message in str(err.value)


def test_central_dp_refuses_non_finite_updates_and_a_missing_generator() -> None:
    acc = CentralDPAccumulator(3, clipping_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(InvalidInput, match="update 0 holds NaN or infinite values"):
        acc.add(np.array([0.0, np.inf, 1.0], np.float32))

    acc.add(np.ones(3, np.float32))
    with pytest.raises(InvalidInput, match="rng must be a numpy.random.Generator"):
        acc.finish(12345)  # type: ignore[arg-type]
