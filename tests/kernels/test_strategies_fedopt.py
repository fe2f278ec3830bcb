"""Server optimisers (FedAvgM, FedAdagrad, FedAdam, FedYogi) over several rounds.

The references follow the papers' update rules line by line in float64
(Hsu et al. 2019; Reddi et al. 2021, Algorithm 2 with m_{-1} = 0 and
v_{-1} = tau^2), carrying their own state between rounds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedrpc.fl import InvalidInput
from fedrpc.fl.strategies import (
    FedOptState,
    fedadagrad_step,
    fedadam_step,
    fedavgm_step,
    fedyogi_step,
)

ROUNDS = 6


def rounds_of_deltas(seed: int, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(size).astype(np.float32)
    # Shrinking, sign-flipping deltas exercise both branches of Yogi's sign.
    deltas = [
        (rng.standard_normal(size) * 0.05 / (1 + r)).astype(np.float32) for r in range(ROUNDS)
    ]
    return base, deltas


def reference_fedavgm(base, deltas, lr, beta):
    x = base.astype(np.float64)
    v = np.zeros_like(x)
    out = []
    for d in deltas:
        # Hsu et al.: v <- beta v + Delta w, w <- w - lr v, with Delta w = -delta.
        grad = -d.astype(np.float64)
        v = beta * v + grad
        x = x - lr * v
        out.append(x.copy())
    return out


def reference_adaptive(base, deltas, rule, eta, beta_1, beta_2, tau):
    x = base.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau * tau)
    out = []
    for d in deltas:
        d = d.astype(np.float64)
        m = beta_1 * m + (1 - beta_1) * d
        if rule == "adagrad":
            v = v + d * d
        elif rule == "adam":
            v = beta_2 * v + (1 - beta_2) * d * d
        else:
            v = v - (1 - beta_2) * d * d * np.sign(v - d * d)
        x = x + eta * m / (np.sqrt(v) + tau)
        out.append(x.copy())
    return out


@pytest.mark.parametrize(("lr", "beta"), [(1.0, 0.0), (1.0, 0.9), (0.5, 0.7), (2.0, 0.3)])
@pytest.mark.parametrize("size", [1, 513])
def test_fedavgm_follows_server_momentum_over_rounds(lr: float, beta: float, size: int) -> None:
    base, deltas = rounds_of_deltas(int(lr * 10 + beta * 100) + size, size)
    expected = reference_fedavgm(base, deltas, lr, beta)
    weights, momentum = base, None

    for r, delta in enumerate(deltas):
        weights, momentum = fedavgm_step(
            weights, delta, momentum, server_learning_rate=lr, server_momentum=beta
        )
        np.testing.assert_allclose(weights, expected[r], rtol=1e-5, atol=1e-6)
        assert weights.dtype == np.float32 and momentum.dtype == np.float32


def test_fedavgm_without_momentum_is_fedavg() -> None:
    base, deltas = rounds_of_deltas(1, 100)

    weights, _ = fedavgm_step(base, deltas[0], None)

    np.testing.assert_array_equal(weights, base + deltas[0])


STEPS: dict[str, Callable[..., tuple[np.ndarray, FedOptState]]] = {
    "adagrad": fedadagrad_step,
    "adam": fedadam_step,
    "yogi": fedyogi_step,
}


@pytest.mark.parametrize("rule", sorted(STEPS))
@pytest.mark.parametrize(
    ("eta", "beta_1", "beta_2", "tau"),
    [(0.1, 0.9, 0.99, 1e-3), (0.03, 0.0, 0.5, 1e-2), (1.0, 0.5, 0.9, 1e-1)],
)
def test_adaptive_optimisers_follow_reddi_et_al_over_rounds(
    rule: str, eta: float, beta_1: float, beta_2: float, tau: float
) -> None:
    base, deltas = rounds_of_deltas(len(rule) * 100 + int(eta * 100), 257)
    expected = reference_adaptive(base, deltas, rule, eta, beta_1, beta_2, tau)
    options = {"eta": eta, "eta_l": 0.05, "beta_1": beta_1, "tau": tau}
    if rule != "adagrad":
        options["beta_2"] = beta_2
    weights, state = base, None

    for r, delta in enumerate(deltas):
        weights, state = STEPS[rule](weights, delta, state, **options)
        np.testing.assert_allclose(weights, expected[r], rtol=1e-5, atol=1e-5)

    assert isinstance(state, FedOptState)
    assert state.m.dtype == np.float32 and state.v.dtype == np.float32


@pytest.mark.parametrize("rule", sorted(STEPS))
def test_adaptive_optimisers_do_not_modify_their_inputs(rule: str) -> None:
    base, deltas = rounds_of_deltas(2, 64)
    _, state = STEPS[rule](base, deltas[0], None)
    saved = [base.copy(), deltas[1].copy(), state.m.copy(), state.v.copy()]

    STEPS[rule](base, deltas[1], state)

    for before, after in zip(saved, [base, deltas[1], state.m, state.v], strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("rule", sorted(STEPS))
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eta": 0.0}, "eta must be > 0"),
        ({"eta": -1.0}, "eta must be > 0"),
        ({"eta_l": 0.0}, "eta_l must be > 0"),
        ({"beta_1": 1.0}, "beta_1 must be in [0, 1)"),
        ({"beta_1": -0.1}, "beta_1 must be in [0, 1)"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"eta": float("nan")}, "eta must be > 0"),
    ],
)
def test_adaptive_optimisers_refuse_bad_parameters(rule: str, options: dict, message: str) -> None:
    base, deltas = rounds_of_deltas(3, 8)

    with pytest.raises(InvalidInput) as err:
        STEPS[rule](base, deltas[0], None, **options)

    assert message in str(err.value)


@pytest.mark.parametrize("rule", ["adam", "yogi"])
@pytest.mark.parametrize("beta_2", [1.0, -0.5])
def test_adam_and_yogi_refuse_bad_beta_2(rule: str, beta_2: float) -> None:
    base, deltas = rounds_of_deltas(3, 8)

    with pytest.raises(InvalidInput, match=r"beta_2 must be in \[0, 1\)"):
        STEPS[rule](base, deltas[0], None, beta_2=beta_2)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("not a state", "state must be the FedOptState"),
        (FedOptState(m=np.zeros(7, np.float32), v=np.ones(8, np.float32)), "state.m has shape"),
        (FedOptState(m=np.zeros(8, np.float32), v=np.ones(8, np.float64)), "state.v is float64"),
    ],
)
def test_adaptive_optimisers_refuse_a_foreign_state(state: object, message: str) -> None:
    base, deltas = rounds_of_deltas(4, 8)

    with pytest.raises(InvalidInput) as err:
        fedadam_step(base, deltas[0], state)  # type: ignore[arg-type]

    assert message in str(err.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"server_learning_rate": 0.0}, "server_learning_rate must be > 0"),
        ({"server_momentum": 1.0}, "server_momentum must be in [0, 1)"),
        ({"server_momentum": -0.1}, "server_momentum must be in [0, 1)"),
    ],
)
def test_fedavgm_refuses_bad_parameters(options: dict, message: str) -> None:
    base, deltas = rounds_of_deltas(5, 8)

    with pytest.raises(InvalidInput) as err:
        fedavgm_step(base, deltas[0], None, **options)

    assert message in str(err.value)


def test_server_steps_refuse_mismatched_vectors() -> None:
    base = np.zeros(8, np.float32)

    with pytest.raises(InvalidInput, match="pseudo_gradient has shape"):
        fedavgm_step(base, np.zeros(9, np.float32), None)
    with pytest.raises(InvalidInput, match="momentum has shape"):
        fedavgm_step(base, np.zeros(8, np.float32), np.zeros(3, np.float32))
    with pytest.raises(InvalidInput, match="base is float64"):
        fedyogi_step(np.zeros(8), np.zeros(8, np.float32), None)
