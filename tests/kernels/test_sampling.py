"""Client selection: uniform without replacement, stratified by platform on request."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedrpc.fl import InvalidInput
from fedrpc.fl.sampling import select_devices

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
