"""Client selection: uniform without replacement, stratified on request, Poisson for DP rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedrpc.fl import InvalidInput
from fedrpc.fl.sampling import poisson_rate, poisson_select, select_devices

POPULATION = [(f"dev_{i:03d}", "ios" if i % 4 == 0 else "android") for i in range(100)]


def test_picks_k_distinct_eligible_devices():
    chosen = select_devices(POPULATION, 10, np.random.default_rng(1))
    assert len(chosen) == len(set(chosen)) == 10
    assert set(chosen) <= {d for d, _ in POPULATION}


def test_same_seed_same_selection_whatever_the_input_order():
    a = select_devices(POPULATION, 10, np.random.default_rng(7))
    b = select_devices(list(reversed(POPULATION)), 10, np.random.default_rng(7))
    assert a == b


def test_selection_is_uniform():
    rng = np.random.default_rng(2024)
    counts = dict.fromkeys((d for d, _ in POPULATION), 0)
    trials = 4000
    for _ in range(trials):
        for d in select_devices(POPULATION, 10, rng):
            counts[d] += 1
    # Each device is picked with probability 10/100; chi-square against that.
    observed = np.array(list(counts.values()))
    expected = np.full(len(observed), trials * 10 / 100)
    assert stats.chisquare(observed, expected).pvalue > 1e-4


@pytest.mark.parametrize(
    ("k", "fraction", "expected"), [(50, 0.1, 10), (5, 0.5, 5), (200, None, 100), (200, 0.011, 2)]
)
def test_fraction_and_population_bound_the_count(k, fraction, expected):
    assert (
        len(select_devices(POPULATION, k, np.random.default_rng(0), fraction=fraction)) == expected
    )


@pytest.mark.parametrize("k", [4, 10, 13, 40])
def test_stratified_selection_keeps_platform_shares(k):
    chosen = set(select_devices(POPULATION, k, np.random.default_rng(3), stratify=True))
    ios = sum(1 for d, p in POPULATION if p == "ios" and d in chosen)
    assert len(chosen) == k
    assert math.floor(k * 0.25) <= ios <= math.ceil(k * 0.25)


def test_empty_population_selects_nothing_and_bad_k_is_refused():
    assert select_devices([], 5, np.random.default_rng(0)) == []
    with pytest.raises(InvalidInput):
        select_devices(POPULATION, 0, np.random.default_rng(0))
    with pytest.raises(InvalidInput):
        select_devices(POPULATION, 3, np.random.default_rng(0), fraction=1.5)


# --- Poisson sampling (DP rounds) -------------------------------------------

IDS = [d for d, _ in POPULATION]


@pytest.mark.parametrize(
    ("target", "n", "fraction", "expected"),
    [
        (10, 100, None, 0.1),
        (3, 8, None, 0.375),
        (50, 20, None, 1.0),
        (10, 100, 0.05, 0.05),
        (10, 100, 0.5, 0.1),
        (1, 1, None, 1.0),
    ],
)
def test_the_rate_is_the_target_share_capped_by_fraction_and_one(target, n, fraction, expected):
    assert poisson_rate(target, n, fraction) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(("n", "q"), [(100, 0.1), (40, 0.5), (7, 0.3)])
def test_poisson_selection_counts_follow_the_binomial(n: int, q: float) -> None:
    """Over many seeds the selection size is Binomial(N, q): a chi-square goodness of fit."""
    trials = 6000
    rng = np.random.default_rng(n * 1000 + round(q * 100))
    counts = np.array([len(poisson_select(IDS[:n], q, rng)) for _ in range(trials)])
    pmf = stats.binom.pmf(np.arange(n + 1), n, q)
    # Pool the tails so every expected cell holds at least 5 draws.
    lo, hi = int(stats.binom.ppf(0.005, n, q)), int(stats.binom.isf(0.005, n, q))
    observed = [np.sum(counts <= lo)] + [np.sum(counts == k) for k in range(lo + 1, hi)]
    observed += [np.sum(counts >= hi)]
    expected = [pmf[: lo + 1].sum()] + list(pmf[lo + 1 : hi]) + [pmf[hi:].sum()]
    expected = np.array(expected) * trials
    assert min(expected) >= 5
    assert stats.chisquare(observed, expected).pvalue > 1e-4
    # Fixed-size sampling would give one count; the spread is Binomial's.
    assert counts.var() == pytest.approx(n * q * (1 - q), rel=0.1)


def test_each_device_is_included_with_probability_q_independently() -> None:
    rng = np.random.default_rng(77)
    trials, q = 4000, 0.2
    hits = np.zeros((trials, len(IDS)), dtype=bool)
    index = {d: i for i, d in enumerate(IDS)}
    for t in range(trials):
        for d in poisson_select(IDS, q, rng):
            hits[t, index[d]] = True
    per_device = hits.sum(axis=0)
    # Each device: Binomial(trials, q); chi-square of the 100 counts against trials * q.
    observed = np.concatenate([per_device, trials - per_device])
    expected = np.concatenate([np.full(len(IDS), trials * q), np.full(len(IDS), trials * (1 - q))])
    assert stats.chisquare(observed, expected, ddof=len(IDS) - 1).pvalue > 1e-4
    # Independence: two devices are both in with probability q^2 (pooled over all pairs).
    both = (hits[:, ::2] & hits[:, 1::2]).sum()
    pairs = trials * (len(IDS) // 2)
    assert stats.binomtest(int(both), pairs, q * q).pvalue > 1e-4


def test_poisson_selection_is_reproducible_may_be_empty_and_q_one_takes_everyone() -> None:
    a = poisson_select(IDS, 0.3, np.random.default_rng(5))
    b = poisson_select(list(reversed(IDS)), 0.3, np.random.default_rng(5))
    assert a == b == sorted(a) and set(a) <= set(IDS)
    assert poisson_select(IDS, 1.0, np.random.default_rng(5)) == sorted(IDS)
    rng = np.random.default_rng(6)
    empty = sum(not poisson_select(IDS[:3], 0.1, rng) for _ in range(2000))
    # P(empty) = 0.9^3 = 0.729.
    assert stats.binomtest(empty, 2000, 0.9**3).pvalue > 1e-4


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan"), True])
def test_poisson_selection_refuses_a_bad_rate(q) -> None:
    with pytest.raises(InvalidInput):
        poisson_select(IDS, q, np.random.default_rng(0))


def test_poisson_rate_refuses_an_empty_population_and_bad_inputs() -> None:
    with pytest.raises(InvalidInput):
        poisson_rate(5, 0)
    with pytest.raises(InvalidInput):
        poisson_rate(0, 5)
    with pytest.raises(InvalidInput):
        poisson_rate(5, 5, 1.5)
    with pytest.raises(InvalidInput):
        poisson_select(["a", "a"], 0.5, np.random.default_rng(0))
