"""FedAvg and FedProx (streaming) against a float64 numpy reference."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from fedrpc.fl import InvalidInput
from fedrpc.fl.strategies import FedAvgAccumulator, FedProxAccumulator, fedavg
from fedrpc.fl.strategies._sum import _BLOCK

# Large enough for two thread ranges of two coordinate blocks, the last partial.
BIG = 5 * _BLOCK // 2 + 1


def reference_weighted_mean(vectors: list[np.ndarray], counts: list[int]) -> np.ndarray:
    stacked = np.stack(vectors).astype(np.float64)
    return np.average(stacked, axis=0, weights=np.asarray(counts, dtype=np.float64))


def random_updates(rng: np.random.Generator, n: int, size: int):
    vectors = [rng.standard_normal(size).astype(np.float32) for _ in range(n)]
    counts = [int(c) for c in rng.integers(1, 10_000, size=n)]
    return vectors, counts


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 33, 256, 300])
@pytest.mark.parametrize("size", [1, 7, 4099])
def test_fedavg_matches_weighted_mean(n: int, size: int) -> None:
    rng = np.random.default_rng(n * 10_007 + size)
    vectors, counts = random_updates(rng, n, size)
    acc = FedAvgAccumulator(size)

    for v, c in zip(vectors, counts, strict=True):
        acc.add(v, c)
    result = acc.finish()

    assert result.dtype == np.float32 and result.shape == (size,)
    np.testing.assert_allclose(
        result, reference_weighted_mean(vectors, counts), rtol=2e-6, atol=2e-6
    )
    assert acc.count == n and acc.total_samples == sum(counts)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("splits", [[0, 40], [0, 3, 19, 20, 40], [0, 1, 17, 33, 40]])
def test_add_many_gives_bit_for_bit_the_result_of_single_adds(
    splits: list[int], threads: int
) -> None:
    rng = np.random.default_rng(sum(splits))
    vectors, counts = random_updates(rng, 40, BIG)
    single = FedAvgAccumulator(BIG)
    grouped = FedAvgAccumulator(BIG, threads=threads)

    for v, c in zip(vectors, counts, strict=True):
        single.add(v, c)
    for a, b in zip(splits, splits[1:], strict=False):
        grouped.add_many(vectors[a:b], counts[a:b])

    np.testing.assert_array_equal(grouped.finish(), single.finish())
    assert grouped.total_samples == sum(counts)


def test_add_many_matches_single_adds_across_the_second_level() -> None:
    # 600 updates: level-1 sums carried into level 2 at 256 and 512, with
    # calls that start and end mid-group.
    rng = np.random.default_rng(17)
    vectors, counts = random_updates(rng, 600, 1001)
    single, grouped = FedAvgAccumulator(1001), FedAvgAccumulator(1001)
    splits = [0, 5, 200, 255, 257, 270, 290, 513, 600]

    for v, c in zip(vectors, counts, strict=True):
        single.add(v, c)
    for a, b in zip(splits, splits[1:], strict=False):
        grouped.add_many(vectors[a:b], counts[a:b])
    result = grouped.finish()

    np.testing.assert_array_equal(result, single.finish())
    np.testing.assert_allclose(
        result, reference_weighted_mean(vectors, counts), rtol=2e-6, atol=2e-6
    )


@pytest.mark.parametrize("n", [1, 16, 17, 50])
def test_fedavg_on_two_threads_matches_weighted_mean(n: int) -> None:
    rng = np.random.default_rng(n)
    vectors, counts = random_updates(rng, n, BIG)
    threads = torch.get_num_threads()
    acc = FedAvgAccumulator(BIG, threads=2)

    for v, c in zip(vectors, counts, strict=True):
        acc.add(v, c)

    np.testing.assert_allclose(
        acc.finish(), reference_weighted_mean(vectors, counts), rtol=2e-6, atol=2e-6
    )
    assert torch.get_num_threads() == threads


def test_fedavg_on_two_threads_finds_non_finite_values_in_the_last_range() -> None:
    vectors = [np.ones(BIG, np.float32) for _ in range(3)]
    vectors[1][-1] = np.inf
    acc = FedAvgAccumulator(BIG, threads=2)
    acc.add_many(vectors, [1, 2, 3])

    with pytest.raises(InvalidInput, match="NaN or infinite"):
        acc.finish()


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_fedavg_refuses_bad_thread_counts(threads: object) -> None:
    with pytest.raises(InvalidInput, match="threads must be a whole number >= 1"):
        FedAvgAccumulator(3, threads=threads)  # type: ignore[arg-type]


def test_add_many_refuses_mismatched_lists() -> None:
    acc = FedAvgAccumulator(2)

    with pytest.raises(InvalidInput, match="2 updates but 1 num_samples"):
        acc.add_many([np.zeros(2, np.float32)] * 2, [1])


def test_fedavg_error_stays_within_a_few_ulp_for_many_updates() -> None:
    # Same-sign values are the worst case for a running float32 sum: its error
    # grows with N (about 30 ulp at N = 1000); the grouped sum must not.
    rng = np.random.default_rng(7)
    vectors = [(0.5 + 0.01 * rng.standard_normal(2000)).astype(np.float32) for _ in range(1000)]
    counts = [int(c) for c in rng.integers(1, 5000, size=1000)]

    result = fedavg(zip(vectors, counts, strict=True), 2000)

    exact = reference_weighted_mean(vectors, counts)
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(result - exact) / ulp) <= 6


def test_fedavg_uses_memory_of_a_few_models_whatever_the_number_of_updates() -> None:
    size = 50_000
    rng = np.random.default_rng(3)
    acc = FedAvgAccumulator(size)
    tracemalloc.start()
    try:
        for _ in range(200):
            acc.add(rng.standard_normal(size, dtype=np.float32), 3)
        acc.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    one_update = 4 * size
    # Two partial-sum buffers (up to 256 updates) and the update being fed.
    assert peak <= 3 * one_update + 64 * 1024


def test_fedavg_reads_read_only_vectors_without_copy_or_warning() -> None:
    data = np.arange(6, dtype=np.float32)
    frozen = np.frombuffer(data.tobytes(), dtype=np.float32)
    acc = FedAvgAccumulator(6)

    acc.add(frozen, 1)
    acc.add(data, 3)

    np.testing.assert_array_equal(acc.finish(), data)


def test_fedavg_leaves_inputs_and_torch_threads_untouched() -> None:
    rng = np.random.default_rng(5)
    vectors, counts = random_updates(rng, 20, 100)
    copies = [v.copy() for v in vectors]
    threads = torch.get_num_threads()

    fedavg(zip(vectors, counts, strict=True), 100)

    assert all(np.array_equal(v, c) for v, c in zip(vectors, copies, strict=True))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    ("vector", "num_samples", "message"),
    [
        (np.zeros(4, np.float32), 0, "num_samples of update 0 must be a whole number >= 1"),
        (np.zeros(4, np.float32), 2.5, "must be a whole number >= 1"),
        (np.zeros(4, np.float32), True, "must be a whole number >= 1"),
        (np.zeros(4, np.float64), 1, "update 0 is float64; updates must be float32"),
        (np.zeros(5, np.float32), 1, "update 0 has shape (5,), expected (4,)"),
        (np.zeros((2, 2), np.float32), 1, "expected (4,)"),
        ([0.0, 0.0, 0.0, 0.0], 1, "must be a numpy float32 vector"),
    ],
)
def test_fedavg_refuses_bad_updates(vector: object, num_samples: object, message: str) -> None:
    acc = FedAvgAccumulator(4)

    with pytest.raises(InvalidInput) as err:
        acc.add(vector, num_samples)  # type: ignore[arg-type]

    assert message in str(err.value)


def test_fedavg_refuses_empty_and_finished_aggregations() -> None:
    acc = FedAvgAccumulator(3)
    with pytest.raises(InvalidInput, match="no updates to aggregate"):
        acc.finish()

    done = FedAvgAccumulator(3)
    done.add(np.ones(3, np.float32), 1)
    done.finish()
    with pytest.raises(InvalidInput, match="already finished"):
        done.add(np.ones(3, np.float32), 1)


def test_fedavg_refuses_non_finite_updates() -> None:
    acc = FedAvgAccumulator(3)
    acc.add(np.array([1.0, np.nan, 2.0], np.float32), 1)

    with pytest.raises(InvalidInput, match="NaN or infinite"):
        acc.finish()


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
def test_fedavg_refuses_bad_sizes(size: object) -> None:
    with pytest.raises(InvalidInput, match="vector size"):
        FedAvgAccumulator(size)  # type: ignore[arg-type]


def test_fedprox_server_side_is_fedavg_and_keeps_mu() -> None:
    rng = np.random.default_rng(11)
    vectors, counts = random_updates(rng, 9, 300)
    acc = FedProxAccumulator(300, proximal_mu=0.01)

    for v, c in zip(vectors, counts, strict=True):
        acc.add(v, c)

    np.testing.assert_allclose(
        acc.finish(), reference_weighted_mean(vectors, counts), rtol=2e-6, atol=2e-6
    )
    assert acc.proximal_mu == 0.01


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), "0.1", None])
def test_fedprox_refuses_bad_mu(mu: object) -> None:
    with pytest.raises(InvalidInput, match="proximal_mu must be"):
        FedProxAccumulator(3, proximal_mu=mu)  # type: ignore[arg-type]
