"""Budget-ledger decisions against Opacus (RDP) and dp-accounting (PLD) references."""

from __future__ import annotations

import math

import pytest

from fedrpc.fl import InvalidInput
from fedrpc.fl.privacy import BudgetCheck, RoundCharge, check_charge
from tests.kernels.privacy_references import (
    dp_accounting_pld,
    dp_accounting_pld_running,
    opacus_epsilon,
)

RECORDED = [RoundCharge(1.0, 0.02, 100), RoundCharge(1.2, 0.05, 40), RoundCharge(1.0, 0.02, 60)]
NEW = RoundCharge(0.9, 0.03, 80)


def test_rdp_decision_reports_composed_epsilons() -> None:
    current = opacus_epsilon(RECORDED, 1e-5)
    projected = opacus_epsilon([*RECORDED, NEW], 1e-5)
    alone = opacus_epsilon([NEW], 1e-5)

    result = check_charge(RECORDED, NEW, epsilon_budget=10.0, delta=1e-5)

    assert result.current_epsilon == pytest.approx(current, rel=1e-6)
    assert result.projected_epsilon == pytest.approx(projected, rel=1e-6)
    assert result.round_epsilon == pytest.approx(alone, rel=1e-6)
    assert result.epsilon_remaining == pytest.approx(10.0 - current, rel=1e-6)
    assert result.exceeds_budget is False
    # Composition, not a sum of per-round epsilons: about 3.71 against 2.59 + 3.08.
    assert result.projected_epsilon < 0.7 * (current + alone)


def test_pld_decision_reports_composed_epsilons() -> None:
    recorded, new = [RoundCharge(1.0, 0.02, 100)], RoundCharge(1.2, 0.05, 40)

    result = check_charge(recorded, new, epsilon_budget=10.0, delta=1e-5, accountant="pld")

    # Both discretise at h = 1e-4, pessimistically: measured about 1e-11 apart.
    current, projected = dp_accounting_pld_running([*recorded, new], 1e-5)
    assert result.current_epsilon == pytest.approx(current, rel=1e-6)
    assert result.projected_epsilon == pytest.approx(projected, rel=1e-6)
    assert result.round_epsilon == pytest.approx(dp_accounting_pld([new], 1e-5), rel=1e-6)


@pytest.mark.parametrize(
    ("where", "exceeds"),
    [(0.5, True), (1 - 1e-6, True), (1 + 1e-6, False), (1.5, False)],
)
def test_charge_exceeds_only_when_projection_passes_the_budget(where: float, exceeds: bool) -> None:
    # Budgets placed by Opacus' epsilons: where=0.5 between current and projected, 1 -/+ 1e-6
    # just below and just above the projection.
    current = opacus_epsilon(RECORDED, 1e-5)
    projected = opacus_epsilon([*RECORDED, NEW], 1e-5)
    budget = current + where * (projected - current)

    result = check_charge(RECORDED, NEW, epsilon_budget=budget, delta=1e-5)

    assert result.exceeds_budget is exceeds


def test_a_budget_equal_to_the_projection_is_not_exceeded() -> None:
    # The rule is projected > budget, so the decision's own projection as the budget passes.
    projected = check_charge(RECORDED, NEW, epsilon_budget=10.0, delta=1e-5).projected_epsilon

    result = check_charge(RECORDED, NEW, epsilon_budget=projected, delta=1e-5)

    assert result.exceeds_budget is False and result.epsilon_remaining > 0


def test_spent_budget_has_nothing_remaining() -> None:
    result = check_charge(RECORDED, NEW, epsilon_budget=0.1, delta=1e-5)

    assert result.epsilon_remaining == 0.0
    assert result.exceeds_budget


def test_first_charge_starts_from_zero() -> None:
    alone = opacus_epsilon([NEW], 1e-6)  # about 3.64

    result = check_charge([], NEW, epsilon_budget=5.0, delta=1e-6)

    assert result == BudgetCheck(
        current_epsilon=0.0,
        projected_epsilon=pytest.approx(alone, rel=1e-6),
        round_epsilon=pytest.approx(alone, rel=1e-6),
        epsilon_remaining=5.0,
        exceeds_budget=False,
    )
    assert check_charge([], NEW, epsilon_budget=0.9 * alone, delta=1e-6).exceeds_budget


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
