"""Pearson's chi-square test of independence on a contingency table of counts.

The counts come from SQL (``GROUP BY`` two categorical variables); this is
``scipy.stats.chi2_contingency`` with its continuity rule: Yates' correction
(Yates 1934) moves each observed count half a unit (at most) toward its
expected count, and only when the table has one degree of freedom (2 x 2).
Cramér's V (Cramér 1946) is ``sqrt(chi2 / (N * (min(r, c) - 1)))`` from the
uncorrected statistic, as ``scipy.stats.contingency.association``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedrpc.fl._errors import InvalidInput
from fedrpc.fl.stats._common import check_flag

__all__ = ["LOW_EXPECTED_COUNT", "ChiSquareResult", "chi_square"]

#: Cells expected to hold fewer counts than this make the chi-square approximation doubtful.
LOW_EXPECTED_COUNT = 5.0


@dataclass(frozen=True, slots=True)
class ChiSquareResult:
    """Outcome of a chi-square test of independence.

    Attributes
    ----------
    statistic, p_value : float
        Pearson's chi-square (Yates-corrected when ``corrected``) and its
        upper-tail p-value.
    dof : int
        ``(rows - 1) * (columns - 1)``.
    expected : tuple of tuple of float
        Expected counts under independence, ``row_sum * column_sum / N``.
    corrected : bool
        Whether Yates' correction was applied.
    cramers_v : float
        Strength of association in [0, 1], from the uncorrected statistic.
    low_expected_cells : int
        Number of cells with an expected count below 5.
    warnings : tuple of str
        Caveats for the reader (empty when there are none).
    """

    statistic: float
    p_value: float
    dof: int
    expected: tuple[tuple[float, ...], ...]
    corrected: bool
    cramers_v: float
    low_expected_cells: int
    warnings: tuple[str, ...]


def _counts(observed: object) -> np.ndarray:
    try:
        table = np.asarray(observed)
    except ValueError:  # ragged nested lists
        raise InvalidInput("observed must be a table of counts with equal-length rows") from None
    if not (np.issubdtype(table.dtype, np.integer) or np.issubdtype(table.dtype, np.floating)):
        raise InvalidInput("observed must be a table of counts (whole numbers)")
    if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 2:
        raise InvalidInput("observed must be a 2-D table with at least 2 rows and 2 columns")
    table = table.astype(float)
    if not np.isfinite(table).all() or (table < 0).any() or (table != np.floor(table)).any():
        raise InvalidInput("observed counts must be whole numbers of 0 or more")
    for axis, name in ((1, "row"), (0, "column")):
        empty = np.flatnonzero(table.sum(axis=axis) == 0)
        if empty.size:
            raise InvalidInput(
                f"{name} {int(empty[0])} has no observations; remove empty rows and "
                "columns before testing"
            )
    return table


def chi_square(observed: object, correction: bool | None = None) -> ChiSquareResult:
    """Test that the row and column variables of ``observed`` are independent.

    Parameters
    ----------
    observed : 2-D array of int
        Counts, at least 2 x 2, no empty row or column.
    correction : bool or None
        Yates' continuity correction for 2 x 2 tables; None means the
        default, True (as scipy). It never applies to larger tables.

    Raises
    ------
    InvalidInput
        On a table that is not 2-D, smaller than 2 x 2, has a negative or
        fractional count, or an empty row or column.
    """
    correct = True if correction is None else check_flag(correction, "correction")
    table = _counts(observed)
    total = table.sum()
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / total
    dof = (table.shape[0] - 1) * (table.shape[1] - 1)
    uncorrected = float(np.sum((table - expected) ** 2 / expected))
    corrected = correct and dof == 1
    if corrected:
        # Move each count toward its expectation by 0.5, never past it.
        gap = expected - table
        shifted = table + np.sign(gap) * np.minimum(0.5, np.abs(gap))
        statistic = float(np.sum((shifted - expected) ** 2 / expected))
    else:
        statistic = uncorrected
    low = int((expected < LOW_EXPECTED_COUNT).sum())
    warnings = ()
    if low:
        warnings = (
            f"{low} of {expected.size} cells have an expected count below 5; the chi-square "
            "p-value may be unreliable (consider merging categories or an exact test)",
        )
    return ChiSquareResult(
        statistic=statistic,
        p_value=float(stats.chi2.sf(statistic, dof)),
        dof=dof,
        expected=tuple(tuple(float(x) for x in row) for row in expected),
        corrected=corrected,
        cramers_v=math.sqrt(uncorrected / total / min(table.shape[0] - 1, table.shape[1] - 1)),
        low_expected_cells=low,
        warnings=warnings,
    )
