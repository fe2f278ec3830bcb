"""FedAvgM: FedAvg with server momentum."""

from __future__ import annotations

import numpy as np

from fedrpc.fl.strategies._common import check_fraction, check_positive, check_vector

__all__ = ["fedavgm_step"]


def fedavgm_step(
    base: np.ndarray,
    pseudo_gradient: np.ndarray,
    momentum: np.ndarray | None,
    *,
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One server step of FedAvgM (Hsu et al. 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification").

    With ``Delta`` the round's FedAvg pseudo-gradient (mean client delta, i.e.
    ``fedavg(client weights) - base``, pointing in the clients' direction)::

        m     = server_momentum * m_prev + Delta
        x_new = base + server_learning_rate * m

    which is the paper's ``v <- beta v + Delta w; w <- w - v`` with
    ``Delta w = -Delta`` and a server learning rate. ``server_momentum = 0``
    and ``server_learning_rate = 1`` give plain FedAvg.

    Parameters
    ----------
    base : numpy.ndarray
        The current global model, flat float32.
    pseudo_gradient : numpy.ndarray
        The round's mean client delta, flat float32.
    momentum : numpy.ndarray or None
        The momentum returned by the previous round for this model, or None on
        the first round (zeros).
    server_learning_rate : float
        > 0.
    server_momentum : float
        In [0, 1).

    Returns
    -------
    (weights, momentum) : tuple of numpy.ndarray
        The new global model and the momentum to pass to the next round.
    """
    lr = check_positive("server_learning_rate", server_learning_rate)
    beta = check_fraction("server_momentum", server_momentum, low=0.0, high=1.0)
    size = check_vector(base, None, "base").size
    check_vector(pseudo_gradient, size, "pseudo_gradient")
    new_momentum = pseudo_gradient.copy()
    if momentum is not None:
        check_vector(momentum, size, "momentum")
        new_momentum += np.float32(beta) * momentum
    weights = np.multiply(new_momentum, np.float32(lr))
    weights += base
    return weights, new_momentum
