"""Adaptive server optimisers of Reddi et al. 2021: shared state and update.

"Adaptive Federated Optimization" (ICLR 2021), Algorithm 2. With ``Delta_t``
the round's mean client delta (the pseudo-gradient)::

    m_t     = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t
    v_t     = <FedAdagrad | FedAdam | FedYogi rule>
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

without bias correction, with ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (the paper
asks for ``v_{-1} >= tau^2``). ``eta_l`` is the clients' learning rate: the
server only validates it and hands it to the round's client configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.strategies._common import check_fraction, check_positive, check_vector

__all__ = ["FedOptState", "fedopt_step"]


@dataclass(frozen=True, slots=True)
class FedOptState:
    """Server optimiser state of one model, persisted by the caller between rounds.

    Attributes
    ----------
    m : numpy.ndarray
        First moment, flat float32.
    v : numpy.ndarray
        Second moment, flat float32.
    """

    m: np.ndarray
    v: np.ndarray


def fedopt_step(
    base: np.ndarray,
    pseudo_gradient: np.ndarray,
    state: FedOptState | None,
    second_moment: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    eta: float,
    eta_l: float,
    beta_1: float,
    tau: float,
) -> tuple[np.ndarray, FedOptState]:
    """Shared body of the three optimisers; ``second_moment(v_prev, delta**2)``."""
    eta = check_positive("eta", eta)
    check_positive("eta_l", eta_l)
    beta_1 = check_fraction("beta_1", beta_1, low=0.0, high=1.0)
    tau = check_positive("tau", tau)
    size = check_vector(base, None, "base").size
    delta = check_vector(pseudo_gradient, size, "pseudo_gradient")
    if state is None:
        m_prev = np.zeros(size, dtype=np.float32)
        v_prev = np.full(size, np.float32(tau) ** 2, dtype=np.float32)
    else:
        if not isinstance(state, FedOptState):
            raise InvalidInput("state must be the FedOptState returned by the previous round")
        m_prev = check_vector(state.m, size, "state.m")
        v_prev = check_vector(state.v, size, "state.v")
    m = np.multiply(m_prev, np.float32(beta_1))
    m += np.float32(1.0 - beta_1) * delta
    v = second_moment(v_prev, np.square(delta))
    step = np.sqrt(v)
    step += np.float32(tau)
    np.divide(m, step, out=step)
    step *= np.float32(eta)
    step += base
    return step, FedOptState(m=m, v=v)


def check_beta_2(beta_2: float) -> float:
    """beta_2 in [0, 1)."""
    return check_fraction("beta_2", beta_2, low=0.0, high=1.0)
