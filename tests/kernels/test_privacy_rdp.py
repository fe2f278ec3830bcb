"""RDP accountant against Opacus, dp-accounting, mpmath and the exact Gaussian curve."""

from __future__ import annotations

import math

import dp_accounting
import mpmath
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp
from opacus.accountants import RDPAccountant

from fedrpc.fl import InvalidInput
from fedrpc.fl.privacy import (
    ORDERS,
    RoundCharge,
    clear_cache,
    compose_epsilon,
    composed_rdp,
    epsilon_from_rdp,
    one_step_rdp,
    rdp_curve,
)
from tests.kernels.privacy_references import (
    dp_accounting_epsilon,
    exact_gaussian_epsilon,
    opacus_epsilon,
)

# --- the sampled grid -------------------------------------------------------


def _sample_cases(seed: int, count: int) -> list[tuple[float, float, int, float]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        sigma = float(np.exp(rng.uniform(math.log(0.5), math.log(5.0))))
        q = 1.0 if rng.random() < 0.15 else float(np.exp(rng.uniform(math.log(1e-3), 0.0)))
        steps = int(np.exp(rng.uniform(0.0, math.log(1e4))))
        cases.append((round(sigma, 3), round(q, 4), steps, float(rng.choice([1e-5, 1e-6]))))
    return cases


CORNERS = [
    (0.5, 1.0, 10_000, 1e-5),
    (5.0, 1e-3, 1, 1e-6),
    (0.5, 0.5, 1, 1e-5),
    (0.5, 1e-3, 10_000, 1e-6),
    (5.0, 1.0, 1, 1e-5),
    (1.0, 0.01, 1_000, 1e-5),
]
SINGLE_ROUNDS = CORNERS + _sample_cases(seed=7, count=14)

HISTORIES = [
    [RoundCharge(1.1, 0.01, 200), RoundCharge(0.9, 0.02, 50), RoundCharge(1.1, 0.01, 300)],
    [RoundCharge(0.6, 0.3, 5), RoundCharge(2.0, 0.05, 1_000), RoundCharge(4.0, 1.0, 2)],
    [RoundCharge(1.0, 0.004, 2_500)] * 4 + [RoundCharge(1.5, 0.1, 40)],
    [RoundCharge(s, q, n) for s, q, n, _ in _sample_cases(seed=11, count=5)],
]

# --- references -------------------------------------------------------------


OPACUS_DEFAULT = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)

# --- single rounds and histories against the libraries ----------------------


def test_opacus_default_orders_are_a_subset_of_ours() -> None:
    assert np.isin(OPACUS_DEFAULT, ORDERS).all()


def test_order_grid_holds_the_specified_orders() -> None:
    wanted = np.concatenate([np.arange(11, 110) / 10, np.arange(11, 64), [128, 256, 512, 1024]])
    assert np.isin(wanted, ORDERS).all()
    assert np.all(np.diff(ORDERS) > 0)


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), SINGLE_ROUNDS)
def test_single_round_epsilon_is_tightest_rdp_and_below_libraries(
    sigma: float, q: float, steps: int, delta: float
) -> None:
    charges = [RoundCharge(sigma, q, steps)]

    ours = compose_epsilon(charges, delta)

    tightest = opacus_epsilon(charges, delta, ORDERS)
    assert ours == pytest.approx(tightest, rel=1e-6, abs=1e-12)
    assert ours <= opacus_epsilon(charges, delta, OPACUS_DEFAULT) * (1 + 1e-9)
    assert ours <= dp_accounting_epsilon(charges, delta) * (1 + 1e-9)


@pytest.mark.parametrize("history", HISTORIES, ids=[f"history{i}" for i in range(len(HISTORIES))])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_history_epsilon_is_tightest_rdp_and_below_libraries(
    history: list[RoundCharge], delta: float
) -> None:
    ours = compose_epsilon(history, delta)

    assert ours == pytest.approx(opacus_epsilon(history, delta, ORDERS), rel=1e-6)
    assert ours <= opacus_epsilon(history, delta, OPACUS_DEFAULT) * (1 + 1e-9)
    assert ours <= dp_accounting_epsilon(history, delta) * (1 + 1e-9)


@pytest.mark.parametrize(("sigma", "steps"), [(0.5, 1), (1.0, 10), (2.0, 100), (5.0, 10_000)])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_full_batch_epsilon_bounds_the_exact_gaussian_curve(
    sigma: float, steps: int, delta: float
) -> None:
    exact = exact_gaussian_epsilon(sigma, steps, delta)

    ours = compose_epsilon([RoundCharge(sigma, 1.0, steps)], delta)

    assert exact <= ours <= 1.3 * exact


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), SINGLE_ROUNDS[:10])
def test_curve_does_not_decrease_with_the_order(
    sigma: float, q: float, steps: int, delta: float
) -> None:
    curve = one_step_rdp(sigma, q)

    # Rényi divergences grow with the order; 1e-14 covers the rounding margin.
    assert np.all(np.diff(curve) >= -1e-14)


@pytest.mark.parametrize("sigma", [0.5, 1.3, 5.0])
def test_full_batch_curve_is_the_closed_form(sigma: float) -> None:
    assert np.allclose(rdp_curve(sigma, 1.0, 7), 7 * ORDERS / (2 * sigma**2), rtol=1e-15)


# --- per-order values against high-precision references ---------------------


def _mp_rdp_integral(sigma: float, q: float, alpha: float) -> float:
    """RDP of one step as the defining integral E_{N(0,s^2)}[(1 - q + q L)^alpha]."""
    with mpmath.workdps(40):
        s, q_, a = mpmath.mpf(sigma), mpmath.mpf(q), mpmath.mpf(alpha)

        def integrand(z):
            ratio = mpmath.exp((2 * z - 1) / (2 * s * s))
            return mpmath.npdf(z, 0, s) * (1 - q_ + q_ * ratio) ** a

        z0 = s * s * mpmath.log(1 / q_ - 1) + mpmath.mpf(0.5)
        points = sorted({-mpmath.inf, -20 * s, mpmath.mpf(0), mpmath.mpf(1), z0, mpmath.inf})
        return float(mpmath.log(mpmath.quad(integrand, points)) / (a - 1))


def _mp_rdp_binomial(sigma: float, q: float, alpha: int) -> float:
    with mpmath.workdps(60):
        s, q_ = mpmath.mpf(sigma), mpmath.mpf(q)
        total = mpmath.fsum(
            mpmath.binomial(alpha, k)
            * (1 - q_) ** (alpha - k)
            * q_**k
            * mpmath.exp(mpmath.mpf(k * k - k) / (2 * s * s))
            for k in range(alpha + 1)
        )
        return float(mpmath.log(total) / (alpha - 1))


@pytest.mark.parametrize(
    ("sigma", "q", "alpha"),
    [(1.0, 0.01, 1.1), (0.5, 0.5, 1.1), (0.7, 0.2, 3.3), (2.0, 0.3, 7.7), (5.0, 0.9, 2.5)],
)
def test_fractional_order_matches_the_defining_integral(
    sigma: float, q: float, alpha: float
) -> None:
    k = int(np.argmin(np.abs(ORDERS - alpha)))

    ours = one_step_rdp(sigma, q)[k]

    # abs: float64 rounding of A ~ 1 (plus our 2e-15 margin on log A), over alpha - 1.
    assert ours == pytest.approx(_mp_rdp_integral(sigma, q, ORDERS[k]), rel=1e-10, abs=1e-13)


@pytest.mark.parametrize(
    ("sigma", "q", "alpha"), [(1.0, 0.01, 2), (0.5, 0.5, 40), (3.0, 0.02, 1024), (0.8, 0.999, 256)]
)
def test_integer_order_matches_the_binomial_sum(sigma: float, q: float, alpha: int) -> None:
    k = int(np.flatnonzero(ORDERS == alpha)[0])

    ours = one_step_rdp(sigma, q)[k]

    assert ours == pytest.approx(_mp_rdp_binomial(sigma, q, alpha), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize(("sigma", "q"), [(1.0, 0.01), (0.5, 0.05), (2.0, 0.3)])
def test_fractional_orders_are_never_above_dp_accountings_absolute_series(
    sigma: float, q: float
) -> None:
    accountant = dpa_rdp.RdpAccountant(orders=list(ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event)

    theirs = accountant.rdp
    ours = one_step_rdp(sigma, q)

    # Integer orders agree; ours carry a deliberate 2e-15 rounding margin on log A.
    assert np.all(ours <= theirs * (1 + 1e-12) + 2e-14)
    fractional = ORDERS != np.round(ORDERS)
    assert np.any(ours[fractional] < theirs[fractional] * (1 - 1e-3))


# --- the conversion ----------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("delta", [1e-5, 1e-6, 0.3])
def test_conversion_matches_dp_accountings_compute_epsilon(seed: int, delta: float) -> None:
    rng = np.random.default_rng(seed)
    rdp = rng.choice([0.0, 1e-14, 1e-3, 0.5, 3.0, np.inf], size=ORDERS.size) * rng.random(
        ORDERS.size
    )
    rdp = np.where(np.isnan(rdp), np.inf, rdp)

    eps, order = epsilon_from_rdp(rdp, delta)

    ref_eps, _ = dpa_rdp.compute_epsilon(list(ORDERS), list(rdp), delta)
    assert eps == pytest.approx(ref_eps, rel=1e-13, abs=1e-15)
    assert order in ORDERS


def test_conversion_of_an_all_infinite_curve_is_infinite() -> None:
    eps, order = epsilon_from_rdp(np.full(ORDERS.size, np.inf), 1e-5)

    assert eps == math.inf
    assert math.isnan(order)


def test_conversion_reports_the_minimising_order() -> None:
    rdp = rdp_curve(1.0, 0.01, 1_000)

    eps, order = epsilon_from_rdp(rdp, 1e-5)

    per_order = rdp - (math.log(1e-5) + np.log(ORDERS)) / (ORDERS - 1) + np.log1p(-1 / ORDERS)
    assert order == ORDERS[np.argmin(per_order)]
    assert eps == pytest.approx(per_order.min(), rel=1e-14)


# --- composition -------------------------------------------------------------


def test_rounds_with_equal_parameters_compose_like_one_round() -> None:
    split = [RoundCharge(1.2, 0.02, 30), RoundCharge(0.9, 0.1, 5), RoundCharge(1.2, 0.02, 70)]

    assert compose_epsilon(split, 1e-5) == pytest.approx(
        compose_epsilon([RoundCharge(1.2, 0.02, 100), RoundCharge(0.9, 0.1, 5)], 1e-5), rel=1e-12
    )
    assert compose_epsilon(split, 1e-5) == pytest.approx(
        compose_epsilon(split[::-1], 1e-5), rel=1e-12
    )


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_composition_is_tighter_than_summing_per_round_epsilons(accountant: str) -> None:
    rounds = [RoundCharge(1.0, 0.05, 20), RoundCharge(1.5, 0.02, 200), RoundCharge(0.8, 0.01, 50)]

    total = compose_epsilon(rounds, 1e-5, accountant)

    summed = sum(compose_epsilon([r], 1e-5, accountant) for r in rounds)
    assert total < 0.75 * summed
    assert total > max(compose_epsilon([r], 1e-5, accountant) for r in rounds)


def test_empty_history_costs_nothing() -> None:
    assert compose_epsilon([], 1e-5) == 0.0
    assert np.all(composed_rdp([]) == 0.0)


def test_cached_curve_cannot_be_corrupted_by_a_caller() -> None:
    clear_cache()
    first = rdp_curve(1.0, 0.03, 10)
    first[:] = 0.0

    again = rdp_curve(1.0, 0.03, 10)

    assert np.all(again > 0)
    with pytest.raises(ValueError, match="read-only"):
        one_step_rdp(1.0, 0.03)[0] = 0.0


# --- validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((0.0, 0.1, 1), "noise_multiplier"),
        ((-1.0, 0.1, 1), "noise_multiplier"),
        ((math.nan, 0.1, 1), "noise_multiplier"),
        ((math.inf, 0.1, 1), "noise_multiplier"),
        (("1.0", 0.1, 1), "noise_multiplier"),
        ((True, 0.1, 1), "noise_multiplier"),
        ((1.0, 0.0, 1), "sample_rate"),
        ((1.0, -0.2, 1), "sample_rate"),
        ((1.0, 1.5, 1), "sample_rate"),
        ((1.0, math.nan, 1), "sample_rate"),
        ((1.0, 0.1, 0), "num_steps"),
        ((1.0, 0.1, -4), "num_steps"),
        ((1.0, 0.1, 2.5), "num_steps"),
        ((1.0, 0.1, True), "num_steps"),
    ],
)
def test_out_of_range_parameters_are_refused(args: tuple, field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        rdp_curve(*args)
    with pytest.raises(InvalidInput, match=field):
        RoundCharge(*args)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, math.nan, "1e-5"])
def test_out_of_range_delta_is_refused(delta: object) -> None:
    with pytest.raises(InvalidInput, match="delta"):
        compose_epsilon([RoundCharge(1.0, 0.1, 1)], delta)
    with pytest.raises(InvalidInput, match="delta"):
        epsilon_from_rdp(rdp_curve(1.0, 0.1, 1), delta)


@pytest.mark.parametrize(
    "rdp", [np.zeros(3), np.full(ORDERS.size, np.nan), -np.ones(ORDERS.size), "curve"]
)
def test_malformed_rdp_curve_is_refused(rdp: object) -> None:
    with pytest.raises(InvalidInput, match="rdp"):
        epsilon_from_rdp(rdp, 1e-5)


@pytest.mark.parametrize("charges", [[(1.0, 0.1, 1)], RoundCharge(1.0, 0.1, 1), 3])
def test_charges_that_are_not_round_charges_are_refused(charges: object) -> None:
    with pytest.raises(InvalidInput, match="RoundCharge"):
        compose_epsilon(charges, 1e-5)


def test_unknown_accountant_is_refused() -> None:
    with pytest.raises(InvalidInput, match="accountant"):
        compose_epsilon([RoundCharge(1.0, 0.1, 1)], 1e-5, "moments")
