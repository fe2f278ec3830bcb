"""Differential-privacy accounting for the Poisson-subsampled Gaussian mechanism.

Pure functions, floats in and out, no torch: this sits on the request path of
``federations.privacy.*``. Rounds compose by adding RDP curves order by order
(or convolving privacy loss distributions) and are converted to
(epsilon, delta) once; per-round epsilons are never summed. See
``docs/privacy.md``.
"""

from fedrpc.fl.privacy._charge import RoundCharge
from fedrpc.fl.privacy.compose import ACCOUNTANTS, clear_cache, compose_epsilon, composed_rdp
from fedrpc.fl.privacy.jobs import history_epsilon_job, price_job
from fedrpc.fl.privacy.ledger import BudgetCheck, check_charge
from fedrpc.fl.privacy.pld import DEFAULT_VALUE_DISCRETIZATION, pld_epsilon
from fedrpc.fl.privacy.rdp import (
    ORDERS,
    curves_of,
    epsilon_from_rdp,
    one_step_rdp,
    rdp_curve,
    remember_curves,
    uncached_pairs,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_VALUE_DISCRETIZATION",
    "ORDERS",
    "BudgetCheck",
    "RoundCharge",
    "check_charge",
    "clear_cache",
    "compose_epsilon",
    "composed_rdp",
    "curves_of",
    "epsilon_from_rdp",
    "history_epsilon_job",
    "one_step_rdp",
    "pld_epsilon",
    "price_job",
    "rdp_curve",
    "remember_curves",
    "uncached_pairs",
]
