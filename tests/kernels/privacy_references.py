"""Independent references for the privacy accounting tests: Opacus, dp-accounting, the exact Gaussian."""

from __future__ import annotations

import math
import warnings

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy import optimize, stats

from fedrpc.fl.privacy import ORDERS, RoundCharge

_OPACUS_CURVES: dict[tuple[float, float], np.ndarray] = {}


def opacus_curve(sigma: float, q: float) -> np.ndarray:
    """Opacus' per-order formulas evaluated on our grid (memoised across tests)."""
    if (sigma, q) not in _OPACUS_CURVES:
        _OPACUS_CURVES[sigma, q] = np.asarray(
            opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(ORDERS))
        )
    return _OPACUS_CURVES[sigma, q]


def opacus_epsilon(charges: list[RoundCharge], delta: float, orders: np.ndarray = ORDERS) -> float:
    """Opacus' RDP of the history on `orders` (a subset of ours), composed and converted once."""
    mask = np.isin(ORDERS, orders)
    rdp = sum(c.num_steps * opacus_curve(c.noise_multiplier, c.sample_rate) for c in charges)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the best order is an end point
        eps, _ = opacus_rdp.get_privacy_spent(orders=ORDERS[mask], rdp=rdp[mask], delta=delta)
    return max(0.0, float(eps))


def _compose(accountant, charges: list[RoundCharge]):
    for c in charges:
        event = dp_accounting.PoissonSampledDpEvent(
            c.sample_rate, dp_accounting.GaussianDpEvent(c.noise_multiplier)
        )
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, c.num_steps))
    return accountant


def dp_accounting_epsilon(charges: list[RoundCharge], delta: float) -> float:
    """dp-accounting's RdpAccountant on its default orders."""
    return float(_compose(dpa_rdp.RdpAccountant(), charges).get_epsilon(delta))


def dp_accounting_pld(charges: list[RoundCharge], delta: float, h: float = 1e-4) -> float:
    """dp-accounting's PLDAccountant at value discretization interval `h`."""
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=h)
    return float(_compose(accountant, charges).get_epsilon(delta))


def dp_accounting_pld_running(
    charges: list[RoundCharge], delta: float, h: float = 1e-4
) -> list[float]:
    """dp-accounting's PLDAccountant epsilon after each of `charges`, composed in one accountant."""
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=h)
    return [float(_compose(accountant, [c]).get_epsilon(delta)) for c in charges]


def exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Balle & Wang 2018: exact epsilon of `steps` unsampled Gaussian releases."""
    s = sigma / math.sqrt(steps)

    def excess(eps: float) -> float:
        upper = stats.norm.cdf(0.5 / s - eps * s)
        lower = math.exp(eps + stats.norm.logcdf(-0.5 / s - eps * s))
        return upper - lower - delta

    return optimize.brentq(excess, 0.0, 1e4, xtol=1e-12)
