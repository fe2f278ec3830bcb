"""Central DP (DP-FedAvg server side): clipping, the fixed-denominator estimator, Gaussian noise.

References are float64 computations written here from the estimator's
definition (McMahan et al. 2018): ``sum_k clip(delta_k) / (q N)`` plus noise of
std ``z C / (q N)``, never values taken from the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedrpc.fl import InvalidInput
from fedrpc.fl.aggregate import aggregate_streaming
from fedrpc.fl.central_dp import CentralDPAccumulator


def with_norms(seed: int, norms: list[float], size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for norm in norms:
        direction = rng.standard_normal(size)
        out.append((direction * norm / np.linalg.norm(direction)).astype(np.float32))
    return out


def reference_estimate(deltas: list[np.ndarray], clip: float, expected: float) -> np.ndarray:
    """Fixed-denominator estimator in float64: the clipped sum over the expected cohort."""
    total = np.zeros(deltas[0].size, dtype=np.float64)
    for d in deltas:
        d = d.astype(np.float64)
        total += d * min(1.0, clip / np.sqrt(np.dot(d, d)))
    return total / expected


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
@pytest.mark.parametrize("cohort", [0.5, 1.0, 1.7])
def test_clipped_sum_over_the_expected_cohort_matches_the_reference(
    norms: list[float], clip: float, clipped: int, size: int, cohort: float
) -> None:
    # The expected cohort q N differs from the realised count: below, equal, above it.
    expected = cohort * len(norms)
    deltas = with_norms(len(norms) + size, norms, size)
    acc = CentralDPAccumulator(
        size, clipping_norm=clip, noise_multiplier=0.0, expected_count=expected
    )

    seen = [acc.add(d) for d in deltas]
    result = acc.finish(np.random.default_rng(0))

    np.testing.assert_allclose(
        result.vector, reference_estimate(deltas, clip, expected), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(seen, norms, rtol=1e-6)
    assert result.num_clipped == clipped
    assert result.fraction_clipped == clipped / len(norms)
    assert result.num_updates == len(norms) and result.noise_std == 0.0
    assert result.expected_count == expected


@pytest.mark.parametrize("expected", [2.0, 6.4, 40.0])
def test_one_device_moves_the_average_by_at_most_clip_over_the_expected_cohort(
    expected: float,
) -> None:
    """The sensitivity the noise is calibrated to: C / (q N), whoever is left out."""
    clip = 0.8
    deltas = with_norms(5, [0.3, 2.5, 0.79, 4.0, 1.2, 0.05], 400)

    def estimate(rows: list[np.ndarray]) -> np.ndarray:
        acc = CentralDPAccumulator(
            400, clipping_norm=clip, noise_multiplier=0.0, expected_count=expected
        )
        for d in rows:
            acc.add(d)
        return acc.finish(np.random.default_rng(0)).vector.astype(np.float64)

    everyone = estimate(deltas)
    shifts = [
        np.linalg.norm(everyone - estimate(deltas[:i] + deltas[i + 1 :]))
        for i in range(len(deltas))
    ]

    assert max(shifts) <= clip / expected * (1 + 1e-5)
    # The clipped devices reach the bound: it is tight, not just an upper bound.
    assert max(shifts) == pytest.approx(clip / expected, rel=1e-4)


def test_a_clipped_update_never_exceeds_the_clipping_norm() -> None:
    deltas = with_norms(1, [1e6, 3.0, 1.0 + 1e-6], 100_000)
    for d in deltas:
        acc = CentralDPAccumulator(
            d.size, clipping_norm=1.0, noise_multiplier=0.0, expected_count=1.0
        )
        acc.add(d)

        norm = np.linalg.norm(acc.finish(np.random.default_rng(0)).vector.astype(np.float64))

        assert norm <= 1.0
        assert norm == pytest.approx(1.0, rel=1e-5)


def test_sample_counts_play_no_part_every_update_weighs_the_same() -> None:
    deltas = with_norms(2, [0.3, 0.4, 0.2], 50)
    acc = CentralDPAccumulator(50, clipping_norm=1.0, noise_multiplier=0.0, expected_count=4.0)

    for d in deltas:
        acc.add(d)

    expected = np.sum(np.stack(deltas).astype(np.float64), axis=0) / 4.0
    np.testing.assert_allclose(
        acc.finish(np.random.default_rng(0)).vector, expected, rtol=1e-6, atol=1e-8
    )


@pytest.mark.parametrize(
    ("z", "clip", "m", "expected"),
    [(1.1, 0.7, 4, 5.0), (0.5, 2.0, 1, 3.2), (3.0, 0.1, 25, 20.0), (1.0, 1.0, 7, 7.0)],
)
def test_noise_has_the_fixed_denominator_standard_deviation(
    z: float, clip: float, m: int, expected: float
) -> None:
    size = 200_000
    acc = CentralDPAccumulator(
        size, clipping_norm=clip, noise_multiplier=z, expected_count=expected
    )
    for _ in range(m):
        acc.add(np.zeros(size, dtype=np.float32))

    result = acc.finish(np.random.default_rng(20240601))

    # Written from the formula: z C / (q N), whatever the realised m.
    sigma = z * clip / expected
    noise = result.vector.astype(np.float64)
    assert result.noise_std == pytest.approx(sigma, rel=1e-12)
    # sum((x / sigma)^2) ~ chi-square(size) if the noise is N(0, sigma^2); two-sided test.
    # At 200k coordinates a std 1% off gives a p-value below 1e-50.
    statistic = float(np.sum((noise / sigma) ** 2))
    p = 2 * min(stats.chi2.cdf(statistic, size), stats.chi2.sf(statistic, size))
    assert p > 1e-6
    assert abs(noise.mean()) <= 6 * sigma / np.sqrt(size)
    # The realised-m scaling is far off whenever m != q N.
    if m != expected:
        wrong = z * clip / m
        statistic = float(np.sum((noise / wrong) ** 2))
        assert stats.chi2.sf(statistic, size) < 1e-12 or stats.chi2.cdf(statistic, size) < 1e-12


def test_noise_comes_only_from_the_callers_generator() -> None:
    deltas = with_norms(3, [0.5, 2.0], 1000)

    def run(seed: int) -> np.ndarray:
        acc = CentralDPAccumulator(
            1000, clipping_norm=1.0, noise_multiplier=1.0, expected_count=2.0
        )
        for d in deltas:
            acc.add(d)
        return acc.finish(np.random.default_rng(seed)).vector

    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def test_full_weights_are_clipped_as_deltas_from_the_base() -> None:
    rng = np.random.default_rng(4)
    base = rng.standard_normal(500).astype(np.float32)
    deltas = with_norms(4, [0.5, 5.0, 1.5], 500)
    acc = CentralDPAccumulator(
        500, clipping_norm=1.0, noise_multiplier=0.0, expected_count=2.5, base=base
    )

    for d in deltas:
        acc.add(base + d)
    result = acc.finish(np.random.default_rng(0))

    np.testing.assert_allclose(
        result.vector, reference_estimate(deltas, 1.0, 2.5), rtol=1e-4, atol=1e-6
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
        (
            {"clipping_norm": 1.0, "noise_multiplier": 1.0, "expected_count": 0.0},
            "expected_count must be > 0",
        ),
        (
            {"clipping_norm": 1.0, "noise_multiplier": 1.0, "expected_count": float("nan")},
            "expected_count must be > 0",
        ),
    ],
)
def test_central_dp_refuses_bad_parameters(options: dict, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        CentralDPAccumulator(10, **{"expected_count": 1.0, **options})

    assert message in str(err.value)


def test_central_dp_refuses_non_finite_updates_and_a_missing_generator() -> None:
    acc = CentralDPAccumulator(3, clipping_norm=1.0, noise_multiplier=1.0, expected_count=1.0)
    with pytest.raises(InvalidInput, match="update 0 holds NaN or infinite values"):
        acc.add(np.array([0.0, np.inf, 1.0], np.float32))

    acc.add(np.ones(3, np.float32))
    with pytest.raises(InvalidInput, match="rng must be a numpy.random.Generator"):
        acc.finish(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["weights", "delta"])
def test_dp_fedavg_publishes_the_estimate_and_no_per_device_statistic(fmt: str) -> None:
    rng = np.random.default_rng(9)
    base = rng.standard_normal(300).astype(np.float32)
    deltas = with_norms(9, [0.2, 3.0, 1.0, 0.7], 300)
    sent = [(base + d if fmt == "weights" else d, 10 * (i + 1)) for i, d in enumerate(deltas)]

    outcome = aggregate_streaming(
        "fedavg",
        {},
        base,
        iter(sent),
        update_format=fmt,
        dp=(0.0, 0.9, 5.5),
        rng=np.random.default_rng(1),
    )

    reference = base.astype(np.float64) + reference_estimate(deltas, 0.9, 5.5)
    np.testing.assert_allclose(outcome.vector, reference, rtol=1e-4, atol=1e-5)
    assert outcome.metrics == {"dp_noise_std": 0.0, "dp_expected_updates": 5.5}
