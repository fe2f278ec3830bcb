"""Epsilon of a federation's whole history of charged rounds.

Rounds are composed before any conversion to (epsilon, delta): the RDP
accountant adds the rounds' RDP curves order by order and converts the sum
once; the PLD accountant convolves every step's privacy loss distribution and
reads epsilon off the result. A per-round epsilon is only ever reported for
one round on its own, never added to another.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.privacy import pld, rdp
from fedrpc.fl.privacy._charge import RoundCharge, check_delta, group_charges
from fedrpc.fl.privacy.pld import DEFAULT_VALUE_DISCRETIZATION, pld_epsilon
from fedrpc.fl.privacy.rdp import ORDERS, _one_step, epsilon_from_rdp

__all__ = ["ACCOUNTANTS", "clear_cache", "compose_epsilon", "composed_rdp"]

ACCOUNTANTS = ("rdp", "pld")


def clear_cache() -> None:
    """Forget every cached one-step RDP curve and PLD (for benchmarks and tests)."""
    rdp.clear_cache()
    pld.clear_cache()


def composed_rdp(charges: Sequence[RoundCharge]) -> np.ndarray:
    """Sum of the charges' RDP curves over :data:`ORDERS` (zeros for no charge).

    Mironov 2017, Proposition 1: RDP composes additively at each order.
    """
    total = np.zeros_like(ORDERS)
    for (sigma, q), steps in group_charges(charges).items():
        total += steps * _one_step(sigma, q)
    return total


def compose_epsilon(
    charges: Sequence[RoundCharge],
    delta: float,
    accountant: str = "rdp",
    *,
    value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION,
) -> float:
    """Epsilon at ``delta`` of all ``charges`` composed.

    Parameters
    ----------
    charges : sequence of RoundCharge
        Every charged round; an empty history costs 0.
    delta : float
        Target delta in (0, 1).
    accountant : {"rdp", "pld"}
        ``"rdp"``: Mironov, Talwar & Zhang 2019 curves, Balle et al. 2020
        conversion. ``"pld"``: pessimistic connect-the-dots PLD (Doroshenko et
        al. 2022), usually tighter and slower.
    value_discretization_interval : float
        Grid spacing of the PLD accountant; ignored by ``"rdp"``.

    Raises
    ------
    InvalidInput
        On an unknown accountant or bad charges, delta or interval.
    """
    if accountant == "rdp":
        check_delta(delta)
        return epsilon_from_rdp(composed_rdp(charges), delta)[0]
    if accountant == "pld":
        return pld_epsilon(charges, delta, value_discretization_interval)
    raise InvalidInput('accountant must be "rdp" or "pld"')
