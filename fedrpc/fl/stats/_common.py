"""What every statistics kernel shares: the confidence level check and the interval type."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from fedrpc.fl._errors import InvalidInput

__all__ = ["ConfidenceInterval", "check_confidence_level", "check_flag"]


@dataclass(frozen=True, slots=True)
class ConfidenceInterval:
    """A two-sided confidence interval.

    Attributes
    ----------
    lower, upper : float
        The bounds.
    level : float
        The confidence level in (0, 1), e.g. 0.95.
    """

    lower: float
    upper: float
    level: float


def check_confidence_level(value: object) -> float:
    """Return ``value`` as a float if it is a confidence level strictly between 0 and 1.

    A result is then significant when its p-value is below ``1 - level``.
    """
    # bool is an int subclass; True is a caller bug, not a level.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput("confidence_level must be a number")
    level = float(value)
    if not (math.isfinite(level) and 0.0 < level < 1.0):
        raise InvalidInput("confidence_level must be greater than 0 and less than 1, e.g. 0.95")
    return level


def check_flag(value: object, name: str) -> bool:
    """Return ``value`` if it is a bool (numpy's included); a truthy string is not a flag."""
    if not isinstance(value, bool | np.bool_):
        raise InvalidInput(f"{name} must be true or false")
    return bool(value)
