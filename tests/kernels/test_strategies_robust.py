"""Median, trimmed mean, Krum, MultiKrum and Bulyan over coordinate chunks.

References hold every update in memory as one float64 matrix and follow the
papers' definitions directly (numpy's median, scipy's trim_mean, explicit
pairwise differences, an argsort-by-distance-to-median for Bulyan).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from scipy import stats

from fedrpc.fl import InvalidInput
from fedrpc.fl.strategies import (
    bulyan,
    fedmedian,
    fedtrimmedavg,
    krum,
    multikrum,
    pairwise_sq_distances,
)

# Budgets that force chunks of a few coordinates (not dividing the size),
# a few dozen, and one chunk for everything.
BUDGETS = [3_000, 40_000, 64 << 20]
SIZES = [1, 211, 1009]


def updates(seed: int, n: int, size: int, byzantine: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(size)
    honest = [centre + 0.1 * rng.standard_normal(size) for _ in range(n - byzantine)]
    attackers = [centre + 5.0 + 3.0 * rng.standard_normal(size) for _ in range(byzantine)]
    mixed = honest + attackers
    order = rng.permutation(n)
    return [mixed[i].astype(np.float32) for i in order]


def as_matrix(vectors: list[np.ndarray]) -> np.ndarray:
    return np.stack(vectors).astype(np.float64)


def reference_distances(x: np.ndarray) -> np.ndarray:
    n = len(x)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = np.sum((x[i] - x[j]) ** 2)
    return d


def reference_scores(d: np.ndarray, members: list[int], neighbours: int) -> list[float]:
    scores = []
    for i in members:
        others = sorted(d[i, j] for j in members if j != i)
        scores.append(sum(others[:neighbours]))
    return scores


def reference_krum_order(x: np.ndarray, f: int) -> list[int]:
    n = len(x)
    scores = reference_scores(reference_distances(x), list(range(n)), n - f - 2)
    return sorted(range(n), key=lambda i: (scores[i], i))


def reference_bulyan(x: np.ndarray, f: int) -> tuple[np.ndarray, list[int]]:
    n = len(x)
    d = reference_distances(x)
    remaining, chosen = list(range(n)), []
    for _ in range(n - 2 * f):
        r = len(remaining)
        scores = reference_scores(d, remaining, min(r - 1, max(1, r - f - 2)))
        chosen.append(remaining.pop(int(np.argmin(scores))))
    s = x[chosen]
    beta = len(chosen) - 2 * f
    med = np.median(s, axis=0)
    nearest = np.argsort(np.abs(s - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(s, nearest, axis=0).mean(axis=0), chosen


@pytest.mark.parametrize("n", [1, 2, 5, 12, 31])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_median_matches_numpy_median(n: int, size: int, budget: int) -> None:
    vectors = updates(n * 7 + size, n, size, byzantine=n // 4)

    result = fedmedian(vectors, memory_budget_bytes=budget)

    assert result.dtype == np.float32
    np.testing.assert_allclose(result, np.median(as_matrix(vectors), axis=0), rtol=1e-7, atol=0)


@pytest.mark.parametrize(
    ("n", "beta"), [(1, 0.0), (4, 0.25), (10, 0.1), (10, 0.0), (17, 0.3), (30, 0.49)]
)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_trimmed_mean_matches_scipy(n: int, beta: float, size: int, budget: int) -> None:
    vectors = updates(n * 13 + size, n, size, byzantine=int(beta * n))

    result = fedtrimmedavg(vectors, beta=beta, memory_budget_bytes=budget)

    expected = stats.trim_mean(as_matrix(vectors), beta, axis=0)
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 6, 25])
@pytest.mark.parametrize("budget", BUDGETS)
def test_pairwise_distances_match_explicit_differences(n: int, budget: int) -> None:
    # Far from the origin and close together: the Gram trick's worst case.
    vectors = [(v + 100.0).astype(np.float32) for v in updates(n, n, 1009)]

    result = pairwise_sq_distances(vectors, memory_budget_bytes=budget)

    np.testing.assert_allclose(
        result, reference_distances(as_matrix(vectors)), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize(("n", "f"), [(3, 0), (7, 2), (13, 3), (24, 5)])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_krum_picks_the_reference_choice(n: int, f: int, size: int, budget: int) -> None:
    vectors = updates(n * 31 + size, n, size, byzantine=f)
    expected = reference_krum_order(as_matrix(vectors), f)[0]

    result = krum(vectors, num_malicious=f, memory_budget_bytes=budget)

    assert result.selected == (expected,)
    np.testing.assert_array_equal(result.vector, vectors[expected])


@pytest.mark.parametrize(("n", "f", "m"), [(5, 1, 1), (9, 2, 5), (20, 4, 16), (20, 4, 20)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("budget", BUDGETS)
def test_multikrum_averages_the_best_scored(
    n: int, f: int, m: int, weighted: bool, budget: int
) -> None:
    vectors = updates(n * 17 + m, n, 1009, byzantine=f)
    counts = [int(c) for c in np.random.default_rng(n).integers(1, 100, size=n)]
    kept = reference_krum_order(as_matrix(vectors), f)[:m]
    weights = np.array([counts[i] for i in kept] if weighted else [1] * m, dtype=np.float64)

    result = multikrum(
        vectors,
        num_malicious=f,
        num_to_keep=m,
        num_samples=counts if weighted else None,
        memory_budget_bytes=budget,
    )

    assert result.selected == tuple(kept)
    expected = np.average(as_matrix(vectors)[kept], axis=0, weights=weights)
    np.testing.assert_allclose(result.vector, expected, rtol=1e-6, atol=1e-7)


def test_krum_rejects_the_attackers() -> None:
    vectors = updates(99, 15, 500, byzantine=4)
    attackers = {i for i, v in enumerate(vectors) if v.mean() > 3}

    kept = multikrum(vectors, num_malicious=4, num_to_keep=11).selected

    assert len(attackers) == 4 and attackers.isdisjoint(kept)


@pytest.mark.parametrize(("n", "f"), [(3, 0), (7, 1), (11, 2), (16, 3), (23, 5)])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_bulyan_matches_the_reference(n: int, f: int, size: int, budget: int) -> None:
    vectors = updates(n * 41 + size, n, size, byzantine=f)
    expected, chosen = reference_bulyan(as_matrix(vectors), f)

    result = bulyan(vectors, num_malicious=f, memory_budget_bytes=budget)

    assert result.selected == tuple(chosen)
    np.testing.assert_allclose(result.vector, expected, rtol=1e-6, atol=1e-6)


def test_robust_strategies_read_memmaps_slice_by_slice(tmp_path) -> None:
    vectors = updates(5, 11, 3001, byzantine=2)
    sources = []
    for i, v in enumerate(vectors):
        v.tofile(tmp_path / f"u{i}.f32")
        sources.append(np.memmap(tmp_path / f"u{i}.f32", dtype=np.float32, mode="r"))
    x = as_matrix(vectors)

    median = fedmedian(sources, memory_budget_bytes=5_000)
    chosen = bulyan(sources, num_malicious=2, memory_budget_bytes=5_000)

    np.testing.assert_allclose(median, np.median(x, axis=0), rtol=1e-7)
    np.testing.assert_allclose(chosen.vector, reference_bulyan(x, 2)[0], rtol=1e-6, atol=1e-6)


CALLS = {
    "median": lambda v, b: fedmedian(v, memory_budget_bytes=b),
    "trimmed": lambda v, b: fedtrimmedavg(v, beta=0.2, memory_budget_bytes=b),
    "krum": lambda v, b: krum(v, num_malicious=2, memory_budget_bytes=b),
    "multikrum": lambda v, b: multikrum(v, num_malicious=2, num_to_keep=5, memory_budget_bytes=b),
    "bulyan": lambda v, b: bulyan(v, num_malicious=2, memory_budget_bytes=b),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_working_memory_stays_within_the_budget(name: str) -> None:
    size, budget = 200_000, 1 << 20
    vectors = updates(1, 12, size, byzantine=2)
    tracemalloc.start()
    try:
        CALLS[name](vectors, budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    result = 4 * size
    # 12 x 200k floats would be 9.6 MB; the budget is 1 MiB. numpy's casting
    # buffers are a documented constant on top.
    assert peak <= result + budget + 256 * 1024


@pytest.mark.parametrize("name", sorted(CALLS))
def test_robust_strategies_refuse_non_finite_updates(name: str) -> None:
    vectors = updates(2, 12, 300)
    vectors[7][123] = np.inf

    with pytest.raises(InvalidInput, match="update 7 holds NaN or infinite values"):
        CALLS[name](vectors, 10_000)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_robust_strategies_leave_torch_threads_as_they_were(name: str) -> None:
    threads = torch.get_num_threads()

    CALLS[name](updates(3, 12, 300), 10_000)

    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda v: fedmedian([]), "no updates to aggregate"),
        (lambda v: fedmedian([v[0], v[1][:-1]]), "update 1 has 299 values, expected 300"),
        (lambda v: fedmedian([v[0], v[1].astype(np.float64)]), "update 1 must give float32 slices"),
        (
            lambda v: fedmedian(v, memory_budget_bytes=0),
            "memory_budget_bytes must be a whole number >= 1",
        ),
        (
            lambda v: fedmedian(v, memory_budget_bytes=50),
            "memory_budget_bytes must be at least 104 for 12 updates",
        ),
        (lambda v: fedtrimmedavg(v, beta=0.5), "beta must be in [0, 0.5), got 0.5"),
        (lambda v: fedtrimmedavg(v, beta=-0.1), "beta must be in [0, 0.5)"),
        (
            lambda v: krum(v[:6], num_malicious=2),
            "krum needs more than 2*num_malicious+2 = 6 updates, got 6",
        ),
        (lambda v: krum(v, num_malicious=-1), "num_malicious must be a whole number >= 0"),
        (
            lambda v: multikrum(v, num_malicious=1, num_to_keep=0),
            "num_to_keep must be a whole number >= 1",
        ),
        (
            lambda v: multikrum(v, num_malicious=1, num_to_keep=13),
            "num_to_keep must be at most the number of updates (12)",
        ),
        (
            lambda v: multikrum(v, num_malicious=1, num_to_keep=3, num_samples=[1] * 11),
            "num_samples has 11 entries for 12 updates",
        ),
        (
            lambda v: multikrum(v, num_malicious=1, num_to_keep=3, num_samples=[0] * 12),
            "num_samples[0] must be a whole number >= 1",
        ),
        (
            lambda v: bulyan(v[:9], num_malicious=2),
            "bulyan needs at least 4*num_malicious+3 = 11 updates, got 9",
        ),
    ],
)
def test_robust_strategies_refuse_bad_parameters(call, message: str) -> None:
    vectors = updates(4, 12, 300)

    with pytest.raises(InvalidInput) as err:
        call(vectors)

    assert message in str(err.value)
