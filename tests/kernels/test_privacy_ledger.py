"""Budget-ledger decisions against Opacus (RDP) and dp-accounting (PLD) references."""

from __future__ import annotations

import math

import pytest

from fedrpc.fl import InvalidInput
from fedrpc.fl.privacy import BudgetCheck, RoundCharge, check_charge
from tests.kernels.privacy_references import dp_accounting_pld, opacus_epsilon

RECORDED = [RoundCharge(1.0, 0.02, 100), RoundCharge(1.2, 0.05, 40), RoundCharge(1.0, 0.02, 60)]
NEW = RoundCharge(0.9, 0.03, 80)


def test_rdp_decision_reports_composed_epsilons() -> None:
    result = check_charge(RECORDED, NEW, epsilon_budget=10.0, delta=1e-5)

    assert result.current_epsilon == pytest.approx(opacus_epsilon(RECORDED, 1e-5), rel=1e-6)
    assert result.projected_epsilon == pytest.approx(
        opacus_epsilon([*RECORDED, NEW], 1e-5), rel=1e-6
    )
    assert result.round_epsilon == pytest.approx(opacus_epsilon([NEW], 1e-5), rel=1e-6)
    assert result.epsilon_remaining == pytest.approx(10.0 - result.current_epsilon)
    # Composition, not a sum of per-round epsilons.
    assert result.projected_epsilon < result.current_epsilon + result.round_epsilon


def test_pld_decision_reports_composed_epsilons() -> None:
    recorded, new = [RoundCharge(1.0, 0.02, 100)], RoundCharge(1.2, 0.05, 40)

    result = check_charge(recorded, new, epsilon_budget=10.0, delta=1e-5, accountant="pld")

    assert result.current_epsilon == pytest.approx(dp_accounting_pld(recorded, 1e-5), abs=1e-3)
    assert result.projected_epsilon == pytest.approx(
        dp_accounting_pld([*recorded, new], 1e-5), abs=1e-3
    )
    assert result.round_epsilon == pytest.approx(dp_accounting_pld([new], 1e-5), abs=1e-3)


@pytest.mark.parametrize(("where", "exceeds"), [(0.5, True), (1.5, False), (1.0, False)])
def test_charge_exceeds_only_when_projection_passes_the_budget(where: float, exceeds: bool) -> None:
    probe = check_charge(RECORDED, NEW, epsilon_budget=10.0, delta=1e-5)
    # where=0.5 puts the budget between current and projected; 1.0 exactly at projected.
    budget = probe.current_epsilon + where * (probe.projected_epsilon - probe.current_epsilon)

    result = check_charge(RECORDED, NEW, epsilon_budget=budget, delta=1e-5)

    assert result.exceeds_budget is exceeds


def test_spent_budget_has_nothing_remaining() -> None:
    result = check_charge(RECORDED, NEW, epsilon_budget=0.1, delta=1e-5)

    assert result.epsilon_remaining == 0.0
    assert result.exceeds_budget


def test_first_charge_starts_from_zero() -> None:
    result = check_charge([], NEW, epsilon_budget=5.0, delta=1e-6)

    assert result == BudgetCheck(
        current_epsilon=0.0,
        projected_epsilon=result.round_epsilon,
        round_epsilon=pytest.approx(opacus_epsilon([NEW], 1e-6), rel=1e-6),
        epsilon_remaining=5.0,
        exceeds_budget=result.round_epsilon > 5.0,
    )


@pytest.mark.parametrize("budget", [0.0, -1.0, math.inf, math.nan, True, "5"])
def test_bad_budget_is_refused(budget: object) -> None:
    with pytest.raises(InvalidInput, match="epsilon_budget"):
        check_charge(RECORDED, NEW, epsilon_budget=budget, delta=1e-5)


@pytest.mark.parametrize(
    ("recorded", "charge", "field"),
    [
        (RECORDED, (0.9, 0.03, 80), "RoundCharge"),
        ([(1.0, 0.1, 1)], NEW, "RoundCharge"),
        (NEW, NEW, "RoundCharge"),
    ],
)
def test_bad_charges_are_refused(recorded: object, charge: object, field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        check_charge(recorded, charge, epsilon_budget=5.0, delta=1e-5)


def test_bad_delta_and_accountant_are_refused() -> None:
    with pytest.raises(InvalidInput, match="delta"):
        check_charge(RECORDED, NEW, epsilon_budget=5.0, delta=0.0)
    with pytest.raises(InvalidInput, match="accountant"):
        check_charge(RECORDED, NEW, epsilon_budget=5.0, delta=1e-5, accountant="gdp")
