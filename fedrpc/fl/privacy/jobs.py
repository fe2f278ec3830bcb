"""The ledger's questions as jobs for a worker process (``fedrpc.math_pool``).

Each job answers its question and also returns the one-step RDP curves the
caller asked to ``learn``: the server keeps its own curve cache, so once a
worker has computed a (noise_multiplier, sample_rate) pair the server prices
it in microseconds without asking again. Arguments and results are plain
values that pickle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrpc.fl.privacy._charge import RoundCharge
from fedrpc.fl.privacy.compose import compose_epsilon
from fedrpc.fl.privacy.ledger import BudgetCheck, check_charge
from fedrpc.fl.privacy.rdp import curves_of

__all__ = ["Curves", "history_epsilon_job", "price_job"]

Curves = dict[tuple[float, float], np.ndarray]


def price_job(
    recorded: Sequence[RoundCharge],
    charge: RoundCharge,
    *,
    epsilon_budget: float,
    delta: float,
    accountant: str,
    learn: Sequence[tuple[float, float]] = (),
) -> tuple[BudgetCheck, Curves]:
    """:func:`check_charge`, and the one-step RDP curves of the pairs in ``learn``."""
    check = check_charge(
        recorded, charge, epsilon_budget=epsilon_budget, delta=delta, accountant=accountant
    )
    return check, curves_of(learn)


def history_epsilon_job(
    recorded: Sequence[RoundCharge], delta: float, *, learn: Sequence[tuple[float, float]] = ()
) -> tuple[float, Curves]:
    """RDP epsilon of the whole history at ``delta``, and the curves of ``learn``."""
    return compose_epsilon(recorded, delta), curves_of(learn)
