"""Decision helpers for a federation's privacy budget ledger (pure; no database).

The caller loads the recorded charges (under whatever lock it needs), asks
:func:`check_charge` about the next one, and records it only if
``exceeds_budget`` is false. Every epsilon here comes from composing the whole
history (see :mod:`fedrpc.fl.privacy.compose`), never from adding up
per-round epsilons.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.privacy._charge import RoundCharge, check_delta, group_charges
from fedrpc.fl.privacy.compose import compose_epsilon, composed_rdp
from fedrpc.fl.privacy.pld import DEFAULT_VALUE_DISCRETIZATION
from fedrpc.fl.privacy.rdp import epsilon_from_rdp, rdp_curve

__all__ = ["BudgetCheck", "check_charge"]


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """What charging one more round would do to a budget.

    Attributes
    ----------
    current_epsilon : float
        Epsilon of the recorded charges.
    projected_epsilon : float
        Epsilon of the recorded charges plus the new one.
    round_epsilon : float
        Epsilon of the new charge on its own (a cost estimate for display;
        it does not add to ``current_epsilon``).
    epsilon_remaining : float
        ``budget - current_epsilon``, floored at 0.
    exceeds_budget : bool
        Whether ``projected_epsilon`` is above the budget's epsilon.
    """

    current_epsilon: float
    projected_epsilon: float
    round_epsilon: float
    epsilon_remaining: float
    exceeds_budget: bool


def check_charge(
    recorded: Sequence[RoundCharge],
    charge: RoundCharge,
    *,
    epsilon_budget: float,
    delta: float,
    accountant: str = "rdp",
    value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION,
) -> BudgetCheck:
    """Price ``charge`` against an (epsilon_budget, delta) budget given ``recorded``.

    Parameters
    ----------
    recorded : sequence of RoundCharge
        Charges already in the ledger.
    charge : RoundCharge
        The round about to be charged.
    epsilon_budget : float
        The federation's total epsilon, finite and > 0.
    delta : float
        The federation's delta, in (0, 1).
    accountant : {"rdp", "pld"}
        See :func:`fedrpc.fl.privacy.compose.compose_epsilon`.

    Raises
    ------
    InvalidInput
        On a bad budget, delta, charge or accountant.
    """
    if (
        isinstance(epsilon_budget, bool)
        or not isinstance(epsilon_budget, numbers.Real)
        or not math.isfinite(epsilon_budget)
        or epsilon_budget <= 0
    ):
        raise InvalidInput("epsilon_budget must be a finite number greater than 0")
    delta = check_delta(delta)
    if not isinstance(charge, RoundCharge):
        raise InvalidInput("charge must be a RoundCharge")
    group_charges(recorded)  # refuses anything but a sequence of RoundCharge
    recorded = list(recorded)
    if accountant == "rdp":
        # One curve sum serves all three numbers.
        past = composed_rdp(recorded)
        step = rdp_curve(charge.noise_multiplier, charge.sample_rate, charge.num_steps)
        current = epsilon_from_rdp(past, delta)[0]
        projected = epsilon_from_rdp(past + step, delta)[0]
        alone = epsilon_from_rdp(step, delta)[0]
    else:
        options = {"value_discretization_interval": value_discretization_interval}
        alone = compose_epsilon([charge], delta, accountant, **options)
        if recorded:
            current = compose_epsilon(recorded, delta, accountant, **options)
            projected = compose_epsilon([*recorded, charge], delta, accountant, **options)
        else:  # nothing recorded: the new charge is the whole history (one FFT, not two)
            current, projected = 0.0, alone
    budget = float(epsilon_budget)
    return BudgetCheck(
        current_epsilon=current,
        projected_epsilon=projected,
        round_epsilon=alone,
        epsilon_remaining=max(0.0, budget - current),
        exceeds_budget=projected > budget,
    )
