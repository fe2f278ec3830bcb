"""PLD accountant against dp-accounting's PLDAccountant and exact hockey-stick curves."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from fedrpc.fl import InvalidInput
from fedrpc.fl.privacy import RoundCharge, compose_epsilon, pld, pld_epsilon
from tests.kernels.privacy_references import dp_accounting_pld, exact_gaussian_epsilon


def exact_one_step_delta(sigma: float, q: float, eps: float) -> float:
    """Exact delta(eps) of one subsampled step, integrating both hockey-stick divergences.

    REMOVE: P = (1-q) N(0,s^2) + q N(-1,s^2) against Q = N(0,s^2); ADD: N(0,s^2)
    against (1-q) N(0,s^2) + q N(1,s^2). Integrated numerically over the densities.
    """
    base = stats.norm(0.0, sigma)
    left, right = stats.norm(-1.0, sigma), stats.norm(1.0, sigma)

    def remove(x: float) -> float:
        p = (1 - q) * base.pdf(x) + q * left.pdf(x)
        return max(0.0, p - math.exp(eps) * base.pdf(x))

    def add(x: float) -> float:
        lower = (1 - q) * base.pdf(x) + q * right.pdf(x)
        return max(0.0, base.pdf(x) - math.exp(eps) * lower)

    lim = 14 * sigma + 2
    kw = {"points": [-1.0, 0.0, 1.0], "limit": 400, "epsabs": 1e-15, "epsrel": 1e-12}
    return max(integrate.quad(remove, -lim, lim, **kw)[0], integrate.quad(add, -lim, lim, **kw)[0])


CASES = [
    ([RoundCharge(1.0, 0.01, 10_000)], 1e-6, 1e-4),
    ([RoundCharge(2.0, 0.3, 50)], 1e-5, 1e-4),
    ([RoundCharge(0.7, 1.0, 3)], 1e-6, 1e-4),
    ([RoundCharge(5.0, 0.001, 1)], 1e-5, 1e-4),
    ([RoundCharge(0.6, 0.5, 20)], 1e-5, 1e-3),
    (
        [RoundCharge(1.1, 0.02, 300), RoundCharge(0.9, 0.01, 500), RoundCharge(1.1, 0.02, 100)],
        1e-5,
        1e-4,
    ),
    ([RoundCharge(3.0, 1.0, 2), RoundCharge(0.8, 0.05, 100)], 1e-6, 1e-4),
]


@pytest.mark.parametrize(
    ("charges", "delta", "h"), CASES, ids=[f"case{i}" for i in range(len(CASES))]
)
def test_epsilon_matches_dp_accounting_at_the_same_discretization(
    charges: list[RoundCharge], delta: float, h: float
) -> None:
    ours = pld_epsilon(charges, delta, value_discretization_interval=h)

    assert ours == pytest.approx(dp_accounting_pld(charges, delta, h), abs=1e-3)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 1), (2.0, 10), (0.8, 4), (5.0, 100)])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_full_batch_epsilon_is_just_above_the_exact_gaussian_curve(
    sigma: float, steps: int, delta: float
) -> None:
    exact = exact_gaussian_epsilon(sigma, steps, delta)

    ours = compose_epsilon([RoundCharge(sigma, 1.0, steps)], delta, "pld")

    assert exact - 1e-9 <= ours <= exact + 1e-3


@pytest.mark.parametrize(("sigma", "q"), [(1.0, 0.01), (0.7, 0.3), (2.0, 0.9)])
def test_one_subsampled_step_is_just_above_its_exact_epsilon(sigma: float, q: float) -> None:
    delta = 1e-5

    ours = pld_epsilon([RoundCharge(sigma, q, 1)], delta)

    # Pessimistic: the exact curve already meets delta at our epsilon ...
    assert exact_one_step_delta(sigma, q, ours) <= delta * (1 + 1e-6)
    # ... and tight: 1e-3 lower it does not.
    assert exact_one_step_delta(sigma, q, ours - 1e-3) > delta


@pytest.mark.parametrize(
    "charges",
    [[RoundCharge(1.0, 0.01, 2_000)], [RoundCharge(1.2, 0.05, 100), RoundCharge(0.9, 0.02, 30)]],
)
def test_pld_is_tighter_than_rdp_on_typical_histories(charges: list[RoundCharge]) -> None:
    assert compose_epsilon(charges, 1e-5, "pld") < compose_epsilon(charges, 1e-5, "rdp")


def test_a_grid_too_large_is_coarsened_into_a_looser_upper_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    charges = [RoundCharge(1.0, 1.0, 50)]
    fine = pld_epsilon(charges, 1e-5)
    pld.clear_cache()
    monkeypatch.setattr(pld, "_MAX_GRID", 1 << 14)

    coarse = pld_epsilon(charges, 1e-5)

    assert coarse >= fine - 1e-9
    assert coarse >= exact_gaussian_epsilon(1.0, 50, 1e-5)
    assert coarse < fine + 0.5


def test_delta_below_the_mass_at_infinite_loss_has_no_finite_epsilon() -> None:
    charges = [RoundCharge(1.0, 0.1, 10)]

    assert pld_epsilon(charges, 1e-30) == math.inf
    assert math.isfinite(compose_epsilon(charges, 1e-30, "rdp"))


def test_empty_history_costs_nothing() -> None:
    assert pld_epsilon([], 1e-5) == 0.0


def test_one_step_pmf_is_a_probability_distribution() -> None:
    for add in (False, True):
        _, probs, inf_mass = pld._one_step(1.0, 0.05, 1e-4, add)

        assert np.all(probs >= 0)
        assert probs.sum() + inf_mass == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("h", [0.0, -1e-4, 2.0, math.nan, True, "1e-4"])
def test_bad_discretization_interval_is_refused(h: object) -> None:
    with pytest.raises(InvalidInput, match="value_discretization_interval"):
        pld_epsilon([RoundCharge(1.0, 0.1, 1)], 1e-5, value_discretization_interval=h)


@pytest.mark.parametrize("delta", [0.0, 1.0, math.nan])
def test_bad_delta_is_refused(delta: float) -> None:
    with pytest.raises(InvalidInput, match="delta"):
        pld_epsilon([RoundCharge(1.0, 0.1, 1)], delta)


@pytest.mark.parametrize("sigma", [1e-6, 9.9e-4])
def test_noise_below_the_pld_floor_is_refused_not_overflowed(sigma):
    # A round may run with such noise (no budget, an exactness test); its loss grid would
    # overflow, so the PLD accountant says so and leaves it to RDP.
    with pytest.raises(InvalidInput, match="RDP"):
        pld_epsilon([RoundCharge(sigma, 0.5, 1), RoundCharge(1.0, 0.5, 10)], 1e-5)
    assert math.isfinite(pld_epsilon([RoundCharge(1e-3, 1.0, 1)], 1e-5))
