"""Input checks and the value type of one charged round.

Every public function of :mod:`fedrpc.fl.privacy` funnels its arguments
through these checks, so a bad value is refused with the same wording whether
it arrives as a :class:`RoundCharge` or as a bare float.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from fedrpc.fl._errors import InvalidInput

__all__ = [
    "NOISE_FLOOR",
    "RoundCharge",
    "check_delta",
    "check_noise",
    "check_rate",
    "check_steps",
    "group_charges",
]


#: The smallest noise multiplier the kernels price. Below about 1e-154, ``2 sigma**2``
#: underflows and the RDP series divide by zero or turn NaN; 1e-100 leaves a margin, and a
#: one-step RDP of ~5e199 per order still sums over 1e8 steps without overflow. The API
#: asks for far more (``schemas._types.NoiseMultiplier``, >= 1e-3; docs/privacy.md).
NOISE_FLOOR = 1e-100


def _real(value: object, name: str) -> float:
    # bool is an int subclass; True as a noise multiplier is a caller bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"{name} must be a number")
    return float(value)


def check_noise(value: object) -> float:
    """Return ``value`` as a float if it is a finite noise multiplier >= :data:`NOISE_FLOOR`."""
    sigma = _real(value, "noise_multiplier")
    if not math.isfinite(sigma) or sigma <= 0.0:
        raise InvalidInput("noise_multiplier must be a finite number greater than 0")
    if sigma < NOISE_FLOOR:
        raise InvalidInput(f"noise_multiplier must be at least {NOISE_FLOOR:g}")
    return sigma


def check_rate(value: object) -> float:
    """Return ``value`` as a float if it is a sampling rate in (0, 1]."""
    q = _real(value, "sample_rate")
    if not (0.0 < q <= 1.0):
        raise InvalidInput("sample_rate must be greater than 0 and at most 1")
    return q


def check_steps(value: object) -> int:
    """Return ``value`` as an int if it is a whole number of steps >= 1."""
    if isinstance(value, bool):
        raise InvalidInput("num_steps must be a whole number")
    if isinstance(value, numbers.Integral):
        steps = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        steps = int(value)
    else:
        raise InvalidInput("num_steps must be a whole number")
    if steps < 1:
        raise InvalidInput("num_steps must be at least 1")
    return steps


def check_delta(value: object) -> float:
    """Return ``value`` as a float if it is a target delta in (0, 1)."""
    delta = _real(value, "delta")
    if not (0.0 < delta < 1.0):
        raise InvalidInput("delta must be greater than 0 and less than 1")
    return delta


@dataclass(frozen=True, slots=True)
class RoundCharge:
    """One charged round: ``num_steps`` releases of the Poisson-subsampled Gaussian.

    Parameters
    ----------
    noise_multiplier : float
        Standard deviation of the Gaussian noise divided by the L2 sensitivity.
    sample_rate : float
        Poisson sampling probability of each participant, in (0, 1].
    num_steps : int
        Number of noisy releases made with these parameters in the round.

    Raises
    ------
    InvalidInput
        If a field is out of range; the values are normalised to float/int.
    """

    noise_multiplier: float
    sample_rate: float
    num_steps: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", check_noise(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", check_rate(self.sample_rate))
        object.__setattr__(self, "num_steps", check_steps(self.num_steps))


def group_charges(charges: Iterable[RoundCharge]) -> dict[tuple[float, float], int]:
    """Total steps per ``(noise_multiplier, sample_rate)``, in first-seen order.

    Steps with the same parameters compose into one self-composition, whatever
    rounds they were charged in, so accountants work per parameter pair.
    """
    if isinstance(charges, RoundCharge) or not isinstance(charges, Iterable):
        raise InvalidInput("charges must be a list of RoundCharge values")
    groups: dict[tuple[float, float], int] = {}
    for charge in charges:
        if not isinstance(charge, RoundCharge):
            raise InvalidInput("charges must be a list of RoundCharge values")
        key = (charge.noise_multiplier, charge.sample_rate)
        groups[key] = groups.get(key, 0) + charge.num_steps
    return groups
